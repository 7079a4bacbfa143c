"""A container's whole life through containerd: `ctr run --rm IMG true`, pclite-runtime (a VM from a warm pool) vs
plain runc, alternating, median of N each. Goal: pclite <= 2x runc.

Two series: the pool refills as it normally does (the claim starts a boot at once, which on the lab's two emulated
CPUs competes with the rest of the container's start), and with the refill deferred until the container is gone
(pclited's max_vms quota = the pool size), which is what a host with spare cores sees on the critical path.

  python tests/bench/containers.py   (as root; in the lab: pclite-lab run -- .venv/bin/python tests/bench/containers.py)

PCLITE_BENCH_RUNS (10), PCLITE_BENCH_MEM_MIB (128). Before each pclite run the pool is back at its target with no
boot in flight, so a refill's boot never competes with the measured run. The runtime's own step timings (claim,
rootfs image and attach, mounts, start, release) come from its log (PCLITE_RUNTIME_LOG).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make the repo importable

from tests.support.artifacts import results_dir  # noqa: E402
from tests.support.containerd import (  # noqa: E402
    IMAGE,
    Containerd,
    busybox_image_tar,
    ensure_cgroup_mount,
    missing_tools,
    runtime_processes,
)
from tests.support.servers import Pclited, short_tmpdir, vmm_processes  # noqa: E402

RUNS = int(os.environ.get("PCLITE_BENCH_RUNS", "10"))
MEM_MIB = int(os.environ.get("PCLITE_BENCH_MEM_MIB", "128"))
POOL = 1  # one ready VM is all sequential runs need; fewer L2 VMs keep the lab's emulated CPUs responsive
RUNTIME = shutil.which("pclite-runtime") or os.path.join(os.path.dirname(sys.executable), "pclite-runtime")
STEP = re.compile(r"(claim|rootfs|mounts|stand-in|mke2fs|swap and mount) (\d+) ms")


def wait_pool_settled(api, deadline_s: float = 300.0) -> None:
    start = time.monotonic()
    while True:
        pool = api.get("/v1/pools/default").json()
        if pool["ready"] >= POOL and pool["booting"] == 0:
            return
        if "consecutive boot failures" in (pool["reason"] or ""):
            raise SystemExit(f"VMs do not boot here (a host whose KVM cannot boot Linux? use the lab): {pool}")
        if time.monotonic() - start > deadline_s:
            raise SystemExit(f"the pool never settled at {POOL} ready: {pool}")
        time.sleep(0.1)


def timed_run(containerd: Containerd, name: str, runtime: bool) -> float:
    flags = ["--runc-binary", RUNTIME] if runtime else []
    start = time.perf_counter()
    proc = containerd.ctr("run", "--rm", *flags, "--snapshotter", "native", IMAGE, name, "true", check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ctr run ({'pclite' if runtime else 'runc'}) failed: {proc.stderr.decode()[-1000:]}")
    return elapsed


def run_series(api, containerd: Containerd, name: str) -> tuple[list[float], list[float]]:
    pclite, runc = [], []
    for index in range(RUNS + 1):  # the first pair warms caches up and is not counted
        wait_pool_settled(api)
        took_pclite = timed_run(containerd, f"p{len(name)}-{index}", runtime=True)
        took_runc = timed_run(containerd, f"r{len(name)}-{index}", runtime=False)
        if index:
            pclite.append(took_pclite)
            runc.append(took_runc)
        print(f"{name}, {'warm-up' if not index else f'run {index}'}: pclite {took_pclite:.2f} s, runc "
              f"{took_runc:.2f} s", flush=True)
    return pclite, runc


def step_medians(log: Path) -> dict[str, float]:
    steps: dict[str, list[float]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        msg = json.loads(line)["msg"]
        for name, ms in STEP.findall(msg):
            steps.setdefault(name, []).append(float(ms))
        for name, pattern in (("start", r"runs after (\d+) ms"), ("release", r"released in (\d+) ms")):
            if match := re.search(pattern, msg):
                steps.setdefault(name, []).append(float(match.group(1)))
    return {name: statistics.median(values) for name, values in steps.items()}


def main() -> int:
    if os.geteuid() != 0 or missing_tools():
        raise SystemExit(f"run as root with {', '.join(missing_tools()) or 'containerd, ctr, runc'} installed")
    if note := ensure_cgroup_mount():
        print(note)
    workdir = short_tmpdir("pcl-ctr-")
    service = Pclited(workdir / "data", boot_concurrency=1, pool_tick_s=0.2, supervise_interval_s=0.1,
                      boot_timeout_s=120, health_interval_s=30)
    service.start()
    runtime_log = workdir / "runtime.log"
    containerd = Containerd(workdir / "containerd", {"PCLITE_SERVER": service.url, "PCLITE_TOKEN": service.token,
                                                     "PCLITE_RUNTIME_LOG": str(runtime_log)})
    results: dict = {"runs": RUNS, "mem_mib": MEM_MIB}
    claimed: list[str] = []
    try:
        containerd.dir.mkdir()
        containerd.start()
        containerd.import_image(busybox_image_tar(workdir / "image.tar"))
        series: dict[str, tuple[list[float], list[float]]] = {}
        for name, max_vms in (("refill concurrent", None), ("refill deferred", POOL)):
            if max_vms is not None:  # the same pclited (and port) with a quota that holds refills back
                service.stop()
                service.env["PCLITE_MAX_VMS"] = str(max_vms)
                service.start()
            with service.client(timeout=300) as api:
                api.put("/v1/flavors/default", json={"mem_mib": MEM_MIB, "pool_target": POOL, "max_age_s": 0})
                series[name] = run_series(api, containerd, name)
                wait_pool_settled(api)
                claimed = [vm["id"] for vm in api.get("/v1/vms").json() if vm["state"] == "claimed"]
    finally:
        containerd.stop()
        service.stop()
        leftovers = vmm_processes(workdir / "data" / "run")
        for pid in list(leftovers.values()) + runtime_processes():
            os.kill(pid, 9)
        steps = step_medians(runtime_log)
        shutil.rmtree(workdir, ignore_errors=True)
    results["steps_ms"] = steps
    for name, (pclite, runc) in series.items():
        ratio = statistics.median(pclite) / statistics.median(runc)
        results[name] = {"pclite_s": statistics.median(pclite), "runc_s": statistics.median(runc), "ratio": ratio}
        print(f"{name}: ctr run --rm IMG true, median of {RUNS}: pclite {statistics.median(pclite):.2f} s, runc "
              f"{statistics.median(runc):.2f} s -> {ratio:.2f}x   [goal <= 2x: {'met' if ratio <= 2 else 'not met'}]")
    print("pclite-runtime steps, both series (median ms): " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()))
    if os.environ.get("PCLITE_IN_LAB"):
        print("(lab figures are emulated: compare ratios, not absolute times)")
    (results_dir() / "containers.json").write_text(json.dumps(results, indent=2))
    if claimed:
        print(f"VMs still claimed after every container was removed: {claimed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
