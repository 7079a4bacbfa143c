"""Claim latency through pclited's REST API: N concurrent clients on a warm pool of N VMs, and cold boots.

  python tests/bench/claim.py        (in the lab: pclite-lab run -- .venv/bin/python tests/bench/claim.py)

PCLITE_BENCH_CLIENTS (16), PCLITE_BENCH_ROUNDS (3), PCLITE_BENCH_COLD (3), PCLITE_BENCH_MEM_MIB (128).
Goal on real KVM: warm p50 <= 5 ms, p99 <= 20 ms. Lab figures are emulated: compare the warm/cold ratio.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make the repo importable

import httpx  # noqa: E402

from tests.support.artifacts import results_dir  # noqa: E402
from tests.support.servers import Pclited, short_tmpdir, vmm_processes  # noqa: E402

CLIENTS = int(os.environ.get("PCLITE_BENCH_CLIENTS", "16"))
ROUNDS = int(os.environ.get("PCLITE_BENCH_ROUNDS", "3"))
COLD = int(os.environ.get("PCLITE_BENCH_COLD", "3"))
MEM_MIB = int(os.environ.get("PCLITE_BENCH_MEM_MIB", "128"))
FILL_TIMEOUT_S = 60.0 + 15.0 * CLIENTS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def wait_ready(api: httpx.Client, flavor: str, count: int) -> float:
    start = time.monotonic()
    while True:
        pool = api.get(f"/v1/pools/{flavor}").json()
        if pool["ready"] >= count:
            return time.monotonic() - start
        if "consecutive boot failures" in (pool["reason"] or ""):
            raise SystemExit(f"VMs do not boot here (is this a host whose KVM cannot boot Linux? use the lab): "
                             f"{pool['reason']}")
        if time.monotonic() - start > FILL_TIMEOUT_S:
            raise SystemExit(f"the pool never reached {count} ready VMs: {pool}")
        time.sleep(0.2)


def claim_round(service: Pclited, flavor: str) -> tuple[list[float], list[str]]:
    """CLIENTS threads, each with its own warmed-up connection, claim at the same instant."""
    barrier = threading.Barrier(CLIENTS)
    latencies, ids, errors = [], [], []
    lock = threading.Lock()

    def client():
        with service.client() as api:
            api.get("/v1/version")  # open the connection before the clock starts
            barrier.wait()
            start = time.perf_counter()
            response = api.post("/v1/vms", json={"flavor": flavor, "wait": False})
            elapsed = time.perf_counter() - start
            with lock:
                if response.status_code == 201 and response.json()["claim"] == "hit":
                    latencies.append(elapsed)
                    ids.append(response.json()["id"])
                else:
                    errors.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"  {len(errors)} claims did not hit: {errors[:3]}", flush=True)
    if len(set(ids)) != len(ids):
        raise SystemExit(f"a VM was handed out twice: {ids}")
    return latencies, ids


def main() -> int:
    workdir = short_tmpdir("pcl-bench-")
    service = Pclited(workdir / "data", boot_concurrency=2, pool_tick_s=0.2, supervise_interval_s=0.1,
                      boot_timeout_s=120, health_interval_s=30, max_vms=CLIENTS * 2 + COLD + 4,
                      max_guest_mem_mib=(CLIENTS * 2 + COLD + 4) * MEM_MIB)
    service.start()
    results: dict = {"clients": CLIENTS, "rounds": ROUNDS, "mem_mib": MEM_MIB}
    try:
        with service.client(timeout=300) as api:
            api.post("/v1/flavors", json={"name": "bench", "mem_mib": MEM_MIB, "pool_target": CLIENTS,
                                          "max_age_s": 0})
            api.post("/v1/flavors", json={"name": "bench-cold", "mem_mib": MEM_MIB, "pool_target": 0})
            warm: list[float] = []
            for round_no in range(ROUNDS):
                fill_s = wait_ready(api, "bench", CLIENTS)
                latencies, ids = claim_round(service, "bench")
                warm += latencies
                print(f"round {round_no + 1}: pool of {CLIENTS} filled in {fill_s:.1f}s; {len(latencies)} hits, "
                      f"median {statistics.median(latencies) * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms",
                      flush=True)
                for vm_id in ids:
                    api.delete(f"/v1/vms/{vm_id}")
            cold: list[float] = []
            for _ in range(COLD):
                start = time.perf_counter()
                response = api.post("/v1/vms", json={"flavor": "bench-cold", "wait": True})
                if response.status_code == 201:
                    cold.append(time.perf_counter() - start)
                    api.delete(f"/v1/vms/{response.json()['id']}", params={"wait": "true"})
                else:
                    print(f"  cold claim failed: {response.status_code} {response.text[:300]}", flush=True)
            api.delete("/v1/flavors/bench")
            api.delete("/v1/flavors/bench-cold")
            server_side = {line.split(" ")[0]: float(line.split(" ")[1]) for line in api.get("/metrics").text
                           .splitlines() if line.startswith("pclite_claim_seconds_") and "bench" in line}
    finally:
        service.stop()
        leftovers = vmm_processes(workdir / "data" / "run")
        for pid in leftovers.values():
            os.kill(pid, 9)
        shutil.rmtree(workdir, ignore_errors=True)

    if warm:
        results["warm_ms"] = {"n": len(warm), "p50": percentile(warm, 50) * 1000, "p99": percentile(warm, 99) * 1000,
                              "max": max(warm) * 1000}
        w = results["warm_ms"]
        print(f"warm claim ({CLIENTS} concurrent clients, n={w['n']}): p50 {w['p50']:.2f} ms, p99 {w['p99']:.2f} ms, "
              f"max {w['max']:.2f} ms   [goal on real KVM: p50 <= 5 ms, p99 <= 20 ms: "
              f"{'met' if w['p50'] <= 5 and w['p99'] <= 20 else 'not met'} here]")
    if cold:
        results["cold_ms"] = {"n": len(cold), "median": statistics.median(cold) * 1000, "max": max(cold) * 1000}
        print(f"cold-boot claim (n={len(cold)}): median {results['cold_ms']['median']:.0f} ms")
    if warm and cold:
        print(f"cold / warm p50: {statistics.median(cold) / percentile(warm, 50):.0f}x")
    results["server_side"] = server_side
    if os.environ.get("PCLITE_IN_LAB"):
        print("(lab figures are emulated: compare ratios, not absolute times)")
    (results_dir() / "claim.json").write_text(json.dumps(results, indent=2))
    if leftovers:
        print(f"VMMs left running after the bench (killed): {leftovers}")
        return 1
    return 0 if warm else 1


if __name__ == "__main__":
    sys.exit(main())
