"""A container's whole life through containerd: `ctr run --rm IMG true`, pclite-runtime (a VM from a warm pool) vs
plain runc, alternating, median of N each. Goal: pclite <= 2x runc.

Every claim starts a refill boot at once; on the lab's two emulated CPUs that boot competes with the rest of the
container's life. Three series, one pclited restarted with other settings between them:
  refill at nice 10   the service's default (refill_nice=10): the refill boots at low CPU priority, concurrently
  refill deferred     max_vms = the pool size: no refill until the container's VM is gone (a host with cores to
                      spare sees about this on the critical path)
  refill at nice 0    refill_nice=0: the refill boots at the priority of everything else, concurrently

  python tests/bench/containers.py   (as root; in the lab: pclite-lab run -- .venv/bin/python tests/bench/containers.py)

PCLITE_BENCH_RUNS (10), PCLITE_BENCH_MEM_MIB (128), PCLITE_BENCH_CLONE (1: the pool refills from clones; 0: cold
boots), PCLITE_BENCH_SERIES (all three; a comma-separated subset of nice10,deferred,nice0). Before each run the pool
is back at its target with no boot in flight: only the refill a pclite run's own claim starts competes with it, and
nothing with runc's. The runtime is the lean launcher `make venv` installs (service/runtime/launcher.py). Its log
(PCLITE_RUNTIME_LOG) gives each invocation's time from exec to exit and its steps (claim, rootfs image and attach,
mounts, start, release).
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

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make the repo importable

from tests.support.artifacts import results_dir  # noqa: E402
from tests.support.containerd import (  # noqa: E402
    IMAGE,
    Containerd,
    busybox_image_tar,
    ensure_cgroup_mount,
    missing_tools,
    runtime_binary,
    runtime_processes,
)
from tests.support.servers import Pclited, short_tmpdir, vmm_processes  # noqa: E402

RUNS = int(os.environ.get("PCLITE_BENCH_RUNS", "10"))
MEM_MIB = int(os.environ.get("PCLITE_BENCH_MEM_MIB", "128"))
CLONE = os.environ.get("PCLITE_BENCH_CLONE", "1") != "0"  # the pool refills from clones (the default) or cold boots
POOL = 1  # one ready VM is all sequential runs need; fewer L2 VMs keep the lab's emulated CPUs responsive
STEP = re.compile(r"(claim|rootfs|mounts|stand-in|mke2fs|cached image|swap and mount) (\d+) ms")
INVOCATION = re.compile(r"^(\w+(?: --force)?) \S+: (\d+) ms from exec to exit, (\d+) ms of it before main")
SERIES = {"nice10": ("refill at nice 10", {"PCLITE_REFILL_NICE": "10"}),
          "deferred": ("refill deferred", {"PCLITE_REFILL_NICE": "0", "PCLITE_MAX_VMS": str(POOL)}),
          "nice0": ("refill at nice 0", {"PCLITE_REFILL_NICE": "0"})}


def wait_pool_settled(api, deadline_s: float = 300.0) -> None:
    start = time.monotonic()
    while True:
        try:
            pool = api.get("/v1/pools/default").json()
        except httpx.TransportError:  # a kept-alive connection pclited closed meanwhile: ask again
            time.sleep(0.1)
            continue
        if pool["ready"] >= POOL and pool["booting"] == 0:
            return
        if "consecutive boot failures" in (pool["reason"] or ""):
            raise SystemExit(f"VMs do not boot here (a host whose KVM cannot boot Linux? use the lab): {pool}")
        if time.monotonic() - start > deadline_s:
            raise SystemExit(f"the pool never settled at {POOL} ready: {pool}")
        time.sleep(0.1)


def timed_run(containerd: Containerd, name: str, runtime: str | None) -> float:
    flags = ["--runc-binary", runtime] if runtime else []
    start = time.perf_counter()
    proc = containerd.ctr("run", "--rm", *flags, "--snapshotter", "native", IMAGE, name, "true", check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ctr run ({'pclite' if runtime else 'runc'}) failed: {proc.stderr.decode()[-1000:]}")
    return elapsed


def dump_vm_logs(data_dir: Path, message: str, service: Pclited) -> None:
    """Before the work directory goes: the logs of the VMs a failure names, and pclited's tail."""
    import re
    for vm_id in dict.fromkeys(re.findall(r"vm-[0-9a-f]{12}", message)):
        for path in sorted(data_dir.glob(f"**/{vm_id}/*")):
            if path.is_file():
                print(f"--- {path} (last 40 lines)\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-40:]), flush=True)
    print(f"--- pclited log (tail)\n{service.log()[-4000:]}", flush=True)


def run_series(api, containerd: Containerd, runtime: str, name: str) -> tuple[list[float], list[float]]:
    pclite, runc = [], []
    for index in range(RUNS + 1):  # the first pair warms caches up and is not counted
        wait_pool_settled(api)
        took_pclite = timed_run(containerd, f"p{len(name)}-{index}", runtime)
        wait_pool_settled(api)  # runc's run must not share the CPUs with the refill pclite's claim started
        took_runc = timed_run(containerd, f"r{len(name)}-{index}", None)
        if index:
            pclite.append(took_pclite)
            runc.append(took_runc)
        print(f"{name}, {'warm-up' if not index else f'run {index}'}: pclite {took_pclite:.2f} s, runc "
              f"{took_runc:.2f} s", flush=True)
    return pclite, runc


def step_medians(log: Path) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """(median ms per step, {command: (median ms from exec to exit, median ms before main())}) from the log."""
    steps: dict[str, list[float]] = {}
    calls: dict[str, list[tuple[float, float]]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        msg = json.loads(line)["msg"]
        for name, ms in STEP.findall(msg):
            steps.setdefault(name, []).append(float(ms))
        for name, pattern in (("start", r"runs after (\d+) ms"), ("release", r"released in (\d+) ms")):
            if match := re.search(pattern, msg):
                steps.setdefault(name, []).append(float(match.group(1)))
        if match := INVOCATION.match(msg):
            calls.setdefault(match.group(1), []).append((float(match.group(2)), float(match.group(3))))
    return ({name: statistics.median(values) for name, values in steps.items()},
            {name: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
             for name, values in calls.items()})


def summarize(name: str, runs: tuple[list[float], list[float]], medians: tuple[dict, dict], results: dict) -> None:
    pclite, runc = runs
    steps, calls = medians
    ratio = statistics.median(pclite) / statistics.median(runc)
    results[name] = {"pclite_s": statistics.median(pclite), "runc_s": statistics.median(runc), "ratio": ratio,
                     "pclite_runs_s": pclite, "runc_runs_s": runc, "steps_ms": steps,
                     "invocations_ms": {k: {"exec_to_exit": v[0], "before_main": v[1]} for k, v in calls.items()}}
    print(f"{name}: ctr run --rm IMG true, median of {len(pclite)}: pclite {statistics.median(pclite):.2f} s, runc "
          f"{statistics.median(runc):.2f} s -> {ratio:.2f}x   [goal <= 2x: {'met' if ratio <= 2 else 'not met'}]")
    print("  pclite-runtime invocations (median ms from exec to exit / before main()): "
          + ", ".join(f"{k} {v[0]:.0f}/{v[1]:.0f}" for k, v in calls.items()))
    print("  pclite-runtime steps (median ms): " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()), flush=True)


def main() -> int:
    if os.geteuid() != 0 or missing_tools():
        raise SystemExit(f"run as root with {', '.join(missing_tools()) or 'containerd, ctr, runc'} installed")
    if note := ensure_cgroup_mount():
        print(note)
    chosen = [key.strip() for key in os.environ.get("PCLITE_BENCH_SERIES", ",".join(SERIES)).split(",")]
    if unknown := [key for key in chosen if key not in SERIES]:
        raise SystemExit(f"PCLITE_BENCH_SERIES: unknown series {unknown}: pick from {', '.join(SERIES)}")
    workdir = short_tmpdir("pcl-ctr-")
    runtime = runtime_binary(workdir)
    quick = Path(runtime).read_bytes()[:4] == b"\x7fELF"
    print(f"runtime: {'C quick path, then ' if quick else ''}{Path(runtime + '-py').read_text().splitlines()[0]}")
    service = Pclited(workdir / "data", boot_concurrency=1, pool_tick_s=0.2, supervise_interval_s=0.1,
                      boot_timeout_s=120, health_interval_s=30)
    runtime_log = workdir / "runtime.log"
    containerd = Containerd(workdir / "containerd", {"PCLITE_RUNTIME_LOG": str(runtime_log)})
    results: dict = {"runs": RUNS, "mem_mib": MEM_MIB}
    claimed: list[str] = []
    series: dict[str, tuple[list[float], list[float]]] = {}
    per_series: dict[str, tuple[dict, dict]] = {}
    try:
        containerd.dir.mkdir()
        for key in chosen:
            name, env = SERIES[key]
            service.stop()  # the same pclited (and port: containerd keeps its environment) with other settings
            service.env.pop("PCLITE_MAX_VMS", None)
            service.env.update(env)
            service.start()
            if containerd.proc is None:
                containerd.env.update({"PCLITE_SERVER": service.url, "PCLITE_TOKEN": service.token})
                containerd.start()
                containerd.import_image(busybox_image_tar(workdir / "image.tar"))
            with service.client(timeout=300) as api:
                api.put("/v1/flavors/default", json={"mem_mib": MEM_MIB, "pool_target": POOL, "max_age_s": 0,
                                                     "clone": CLONE})
                runtime_log.write_text("")
                series[name] = run_series(api, containerd, runtime, name)
                per_series[name] = step_medians(runtime_log)
                summarize(name, series[name], per_series[name], results)  # now: a lab that dies later keeps it
                wait_pool_settled(api)
                claimed += [vm["id"] for vm in api.get("/v1/vms").json() if vm["state"] == "claimed"]
    except SystemExit as exc:
        dump_vm_logs(workdir / "data", str(exc.code), service)
        raise
    finally:
        containerd.stop()
        service.stop()
        leftovers = vmm_processes(workdir / "data" / "run")
        for pid in list(leftovers.values()) + runtime_processes():
            os.kill(pid, 9)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nsummary:")
    for name in series:
        summarize(name, series[name], per_series[name], results)
    if os.environ.get("PCLITE_IN_LAB"):
        print("(lab figures are emulated: compare ratios, not absolute times)")
    (results_dir() / "containers.json").write_text(json.dumps(results, indent=2))
    if claimed:
        print(f"VMs still claimed after every container was removed: {claimed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
