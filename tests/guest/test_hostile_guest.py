"""A hostile guest cannot grow the host (issue 12): one booted VM whose root processes forge agent frames on
/dev/hvc0 (the agent's own channel), flood the console, and leave their stdin unread.

Forged frames need the id of the exec they target: the VMM numbers requests 1, 2, 3, ... so the id of the next
request is the id of an interactive process just started, plus one (this test module is the VM's only client).
While a forger writes, the agent stays silent (the forger's own stdout goes to /dev/null), so the frames never
interleave with the agent's. Every write to a terminal (/dev/hvc0, /dev/ttyS0) happens in a subshell: the exec's
own shell is a session leader, and a terminal it opened would become its controlling tty, hung up (for the agent
too) when it exits.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from hypervisor import agent_protocol as P
from hypervisor.client import VmmError
from tests.guest.test_agent import BootedVm

CONSOLE_CAP = 16384
MIB = 1 << 20
FLOOD_MIB = 1024          # what the forger tries to send, 64 KiB frames, 1 MiB per write
FLOOD_SECONDS = 240       # ... unless the emulated lab is too slow for that: then what it sent in this time
MIN_FLOOD_MIB = 128       # the least that makes the test mean something (2x the RSS margin)



# Too slow for the lab: its guests run under shadow paging (npt=0), where the forger's pipes reach ~50 MiB in 4
# minutes and a console flood takes longer than the exec's timeout to stop. The host covers the same bounds
# (test_agent_bounds, test_capped_log); these are expected failures, not run, until they fit the lab.
TOO_SLOW_FOR_THE_LAB = pytest.mark.xfail(run=False, reason="issue 12: the flood does not fit the lab's time")

@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    saved = os.environ.get("PCLITE_LOG_MAX_BYTES")
    os.environ["PCLITE_LOG_MAX_BYTES"] = str(CONSOLE_CAP)  # the VMM's console.log cap (hypervisor/capped_log.py)
    try:
        booted = BootedVm(tmp_path_factory.mktemp("hostile-vm"))
    finally:
        if saved is None:
            del os.environ["PCLITE_LOG_MAX_BYTES"]
        else:
            os.environ["PCLITE_LOG_MAX_BYTES"] = saved
    yield booted
    booted.stop()


def next_request_id(vm) -> int:
    process = vm.client.start_process(["true"])
    for _ in process.events():
        pass
    return process.exec_id + 1


def vmm_memory_kib(vm) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{vm.proc.pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def vmm_threads(vm) -> int:
    return len(os.listdir(f"/proc/{vm.proc.pid}/task"))


@TOO_SLOW_FOR_THE_LAB
def test_forged_gigabyte_of_stdout_under_a_1_mib_cap(vm):
    exec_id = next_request_id(vm)
    frame = P.encode_frame(P.MsgType.STDOUT, exec_id, b"x" * P.MAX_OUTPUT_CHUNK)  # the agent would send <= 1 MiB
    script = (f"exec >/dev/null 2>&1; cat > /tmp/frame; "
              f"for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do cat /tmp/frame; done > /tmp/frames; "
              f"( end=$(( $(date +%s) + {FLOOD_SECONDS} )); n=0; "
              f"while [ $n -lt {FLOOD_MIB} ] && [ $(date +%s) -lt $end ]; do "
              f"cat /tmp/frames > /dev/hvc0; n=$((n + 1)); done; echo $n > /tmp/flood-mib ); true")
    before = vmm_memory_kib(vm)
    started = time.monotonic()
    result = vm.client.exec(["sh", "-c", script], stdin=frame, output_cap=MIB,
                            timeout_s=FLOOD_SECONDS + 120)
    elapsed = time.monotonic() - started
    after = vmm_memory_kib(vm)
    sent_mib = int(vm.client.exec(["cat", "/tmp/flood-mib"]).stdout)
    growth_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
    print(f"\nforged {sent_mib} MiB of STDOUT in {elapsed:.1f} s under a 1 MiB cap: VMM RSS {before['VmRSS']} KiB "
          f"before, {after['VmRSS']} KiB after, peak {after['VmHWM']} KiB (+{growth_mib:.1f} MiB); "
          f"kept {len(result.stdout)} bytes, truncated={result.stdout_truncated}")
    assert result.exit_code == 0
    assert sent_mib >= min(FLOOD_MIB, MIN_FLOOD_MIB), f"the lab forged only {sent_mib} MiB in {FLOOD_SECONDS} s"
    assert len(result.stdout) == MIB and result.stdout_truncated
    assert growth_mib < 64


def test_malformed_exit_ends_a_streamed_exec_within_a_second(vm):
    exec_id = next_request_id(vm)
    bad_exit = P.encode_frame(P.MsgType.EXIT, exec_id, b"\x00\x00\x00")  # EXIT needs 16 bytes
    # a marker through the agent, a pause (so the agent's frame is out before the forgery), then the forgery
    script = "cat > /tmp/bad-exit; echo forging; sleep 1; ( cat /tmp/bad-exit > /dev/hvc0 ); sleep 60"
    seen: dict[str, float] = {}

    def on_output(stream: int, data: bytes) -> None:
        seen.setdefault("marker", time.monotonic())

    threads = vmm_threads(vm)
    with pytest.raises(VmmError, match="malformed EXIT frame") as error:
        vm.client.exec(["sh", "-c", script], stdin=bad_exit, on_output=on_output, timeout_s=120)
    ended = time.monotonic() - seen["marker"]
    deadline = time.monotonic() + 5
    while vmm_threads(vm) > threads and time.monotonic() < deadline:  # the API's connection thread winds down
        time.sleep(0.1)
    print(f"\nstream ended {ended:.2f} s after the marker (1 s of it the guest's sleep): {error.value}; VMM threads "
          f"{threads} before, {vmm_threads(vm)} after")
    assert ended < 2.0  # forged 1 s after the marker: the stream ended within a second of the forgery
    assert vmm_threads(vm) <= threads  # the exec's thread is gone
    assert vm.client.ping() < 5  # the channel itself is fine


def test_blocked_stdin_delays_neither_ping_nor_another_exec(vm):
    baseline_ping = min(vm.client.ping() for _ in range(3))
    started = time.monotonic()
    vm.client.exec(["echo", "warm"])
    baseline_exec = time.monotonic() - started
    stuck = vm.client.start_process(["sleep", "600"])  # never reads its stdin
    def feed() -> None:
        try:  # noqa: SIM105 - the outcome does not matter: it may wait out its time, or end with the process
            stuck.write(bytes(4 * MIB))  # far over the 1 MiB window: the VMM holds the rest back
        except Exception:  # noqa: BLE001
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    time.sleep(3)  # the window is full and the agent's buffer for it too
    pings = [vm.client.ping() for _ in range(3)]
    started = time.monotonic()
    other = vm.client.exec(["echo", "other"], timeout_s=60)
    other_s = time.monotonic() - started
    print(f"\nwith one exec's stdin backed up: ping {max(pings) * 1000:.0f} ms "
          f"(baseline {baseline_ping * 1000:.0f} ms), another exec {other_s * 1000:.0f} ms "
          f"(baseline {baseline_exec * 1000:.0f} ms); stdin writer still waiting: {writer.is_alive()}")
    assert other.stdout == b"other\n"
    assert max(pings) < baseline_ping + 1.0 and other_s < baseline_exec + 1.0
    stuck.signal(9)
    writer.join(60)
    kinds = [kind for kind, _ in stuck.events()]
    assert kinds[-1] == "exit"


@TOO_SLOW_FOR_THE_LAB
def test_console_flood_leaves_console_log_at_its_cap(vm):
    script = "( i=0; while :; do echo \"console flood line $i\"; i=$((i + 1)); done > /dev/ttyS0 ); true"
    result = vm.client.exec(["sh", "-c", script], timeout_s=15)
    assert result.timed_out
    size = vm.console.stat().st_size
    text = vm.console.read_bytes()
    lines = [line for line in text.split(b"\n") if line.startswith(b"console flood line")]
    print(f"\nconsole.log after 15 s of flooding: {size} bytes (cap {CONSOLE_CAP}), last line {lines[-1]!r}")
    assert size <= CONSOLE_CAP
    assert b"[pclite: earlier output dropped" in text  # it did pass the cap and kept its tail
    assert int(lines[-2].split()[-1]) > 1000  # lines[-1] may be cut short by the timeout's kill
    assert vm.client.ping() < 5  # the VM keeps serving
