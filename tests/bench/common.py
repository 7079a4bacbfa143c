"""Shared by the benchmarks: repeat a boot, summarise, print ratios against a peer measured in the same run."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make the repo importable

from tests.support.timing import time_until_line  # noqa: E402

READY = r"pclite-init: ready cpus=\d+ mem_kib=\d+"
RUNS = int(os.environ.get("PCLITE_BENCH_RUNS", "10"))


def repeat(name: str, cmd: list[str], runs: int = RUNS, pattern: str = READY, timeout_s: float = 120):
    """Boot `runs` times; returns (seconds list, outputs). A boot that never prints the line is reported."""
    seconds, outputs = [], []
    for run in range(1, runs + 1):
        boot = time_until_line(cmd, pattern, timeout_s)
        if boot.seconds is None:
            print(f"  {name}: no ready line; last output:\n{boot.output[-800:]}", flush=True)
            continue
        seconds.append(boot.seconds)
        outputs.append(boot.output)
        print(f"  {name}, run {run}/{runs}: {boot.seconds:.2f} s", flush=True)  # a stall shows where it is
    return seconds, outputs


def interleaved(series: dict, runs: int = RUNS, pattern: str = READY, timeout_s: float = 120) -> dict:
    """Round-robin over the series, one boot each per round: load drift in the (emulated, shared) lab then hits
    every series alike. Returns {name: (seconds, outputs)}; prints one line per round so a stall is visible."""
    results = {name: ([], []) for name in series}
    for round_no in range(1, runs + 1):
        line = []
        for name, cmd in series.items():
            boot = time_until_line(cmd, pattern, timeout_s)
            if boot.seconds is None:
                print(f"  {name}: no ready line; last output:\n{boot.output[-800:]}", flush=True)
                line.append("FAIL")
                continue
            results[name][0].append(boot.seconds)
            results[name][1].append(boot.output)
            line.append(f"{boot.seconds:.2f}")
        print(f"  round {round_no}/{runs}: {' '.join(line)} s", flush=True)
    return results


def summary(name: str, seconds: list[float]) -> str:
    if not seconds:
        return f"{name:<44} FAILED"
    return (f"{name:<44} median {statistics.median(seconds):6.3f}s  min {min(seconds):6.3f}s  "
            f"max {max(seconds):6.3f}s  (n={len(seconds)})")


def ratio(name: str, seconds: list[float], baseline_name: str, baseline: list[float]) -> str:
    if not seconds or not baseline:
        return f"{name} vs {baseline_name}: n/a"
    value = statistics.median(seconds) / statistics.median(baseline)
    return f"{name} / {baseline_name}: {value:.2f}x"
