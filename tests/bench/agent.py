"""Agent channel: exec round trip of `true` and stdout throughput, vs the serial console, in one VM.

The serial console is the baseline a VMM without a virtio channel has: one VM exit per byte. Its throughput is
measured with the guest writing to /dev/ttyS0 (a smaller amount: at ~4 KB/s in the lab 16 MiB would take hours).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make the repo importable

from tests.guest.test_agent import BootedVm  # noqa: E402

RUNS = int(os.environ.get("PCLITE_BENCH_EXEC_RUNS", "100"))
AGENT_BYTES = 16 << 20
SERIAL_BYTES = 64 << 10


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vm = BootedVm(Path(tmp), vcpus=1, mem_mib=256)
        try:
            client = vm.client
            client.exec(["true"])  # warm: page cache, first fork
            trips = []
            for _ in range(RUNS):
                started = time.monotonic()
                assert client.exec(["true"]).exit_code == 0
                trips.append(time.monotonic() - started)
            pings = [client.ping() for _ in range(RUNS)]
            started = time.monotonic()
            big = client.exec(["head", "-c", str(AGENT_BYTES), "/dev/zero"], output_cap=AGENT_BYTES, timeout_s=600)
            agent_s = time.monotonic() - started
            assert len(big.stdout) == AGENT_BYTES, len(big.stdout)
            serial = client.exec(["sh", "-c", f"time -p head -c {SERIAL_BYTES} /dev/zero > /dev/ttyS0"],
                                 timeout_s=600)
            serial_s = float(next(line.split()[1] for line in serial.stderr.decode().splitlines()
                                  if line.startswith("real")))
        finally:
            vm.stop()
    agent_rate, serial_rate = AGENT_BYTES / agent_s, SERIAL_BYTES / serial_s
    print("agent channel (virtio-console) vs serial console, one lab VM, 1 vCPU:")
    print(f"  exec `true` round trip: median {statistics.median(trips) * 1000:.1f} ms, "
          f"p90 {sorted(trips)[int(len(trips) * 0.9)] * 1000:.1f} ms (n={RUNS})")
    print(f"  agent ping round trip:  median {statistics.median(pings) * 1000:.1f} ms (n={RUNS})")
    print(f"  stdout throughput: agent {agent_rate / 2**20:.2f} MiB/s ({AGENT_BYTES >> 20} MiB in {agent_s:.2f} s); "
          f"serial {serial_rate / 2**10:.1f} KiB/s ({SERIAL_BYTES >> 10} KiB in {serial_s:.2f} s): "
          f"{agent_rate / serial_rate:.0f}x")


if __name__ == "__main__":
    main()
