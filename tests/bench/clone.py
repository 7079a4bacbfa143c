"""Clone from a snapshot vs cold boot, to agent-ready; memory per clone with 20 clones running.

Each VM is timed from the moment it is asked for (process spawn, or the fork server request) until a GET /status
says agent_ready (a restored VMM serves its API only once it is ready, so a clone needs one status call), and
until its first exec (`true`) has answered. Both launch paths are measured: a fresh `python` per VM, and a fork of
the pre-imported fork server (what pclited uses; it keeps a warm VMM, forked with its KVM VM made, ahead of
requests: also measured without), round-robin so that other load on the (shared) lab weighs on all of them alike.
The forked runs are also timed jailed (hypervisor/jail.py, as pclited jails its VMMs when root: own uid, mount/pid/
net/ipc/uts namespaces, a cgroup leaf when cgroup v2 has the controllers), against the same runs unjailed.
Memory: /proc/PID/smaps_rollup of 20 clones (forked) running at once, plus Private_Dirty of the guest-RAM mapping
alone: the pages a clone has copied from the snapshot (with one clone alone, snapshot pages only it maps would count
as private too). Goals (issue 7): clone >= 20x faster than cold boot in the lab, <= 10 ms on
real KVM, <= 8 MiB private memory per clone. Lab figures are emulated: read the ratios.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make the repo importable

from hypervisor import jail  # noqa: E402
from hypervisor.client import VmmClient, VmmError  # noqa: E402
from hypervisor.forkserver import spawn  # noqa: E402
from hypervisor.launch import vmm_command  # noqa: E402
from tests.guest.test_agent import AGENT_CMDLINE, BootedVm  # noqa: E402
from tests.support.artifacts import guest_artifacts, results_dir  # noqa: E402
from tests.support.pclite import ForkServer  # noqa: E402

RUNS = int(os.environ.get("PCLITE_BENCH_CLONE_RUNS", "10"))
COLD_RUNS = int(os.environ.get("PCLITE_BENCH_COLD_RUNS", "5"))
CLONES = 20
MEM_MIB = 128
TIMEOUT_S = 180
FAILURES: list[str] = []  # runs that never got ready: printed at the end, and the bench exits 1
JAIL_UID_BASE = 300000
JAIL_CGROUP = "/sys/fs/cgroup/pclite-bench"
JAIL_CGROUP_OK = False  # set by main(): cgroup v2 with the controllers
_jail_uids = iter(range(JAIL_UID_BASE, JAIL_UID_BASE + 100000))


class Started:
    """One VMM being timed: asked for at t0, ready when GET /status says so."""

    def __init__(self, tmp: Path, name: str, argv: list[str], forkserver: str | None, jailed: bool = False):
        self.cgroup = None
        plan = None
        if jailed:  # its own directory: the jail holds it (read-write), its images (read-only) and nothing else
            directory = tmp / name
            directory.mkdir()
            uid = next(_jail_uids)
            self.cgroup = f"{JAIL_CGROUP}/{name}" if JAIL_CGROUP_OK else None
            images = [argv[argv.index(flag) + 1] for flag in ("--kernel", "--initrd", "--from") if flag in argv]
            plan = jail.JailPlan(vm_id=name, uid=uid, gid=uid, root=str(tmp / "jail-root"), read_only=images,
                                 read_write=[str(directory)], owned=[str(directory)], cgroup=self.cgroup,
                                 memory_max=(MEM_MIB + 256) << 20, pids_max=80, cpu_weight=100).to_json()
        else:
            directory = tmp
        self.sock, self.log = directory / f"{name}.sock", directory / f"{name}.log"
        self.console = directory / f"{name}.console"
        argv = [*argv, "--api-sock", str(self.sock), "--console", str(self.console)]  # quiet: a panic would show
        with open(self.log, "wb") as out, open(os.devnull, "rb") as devnull:
            self.t0 = time.monotonic()
            if forkserver:
                self.proc = spawn(forkserver, argv, devnull.fileno(), out.fileno(), out.fileno(), jail=plan)
            else:
                self.proc = subprocess.Popen(vmm_command(argv), stdin=devnull, stdout=out, stderr=out,
                                             start_new_session=True)
        self.pid = self.proc.pid

    def wait_ready(self) -> float:
        deadline = self.t0 + TIMEOUT_S
        while True:
            if self.sock.exists():
                try:
                    if VmmClient(self.sock).status()["agent_ready"]:
                        return time.monotonic() - self.t0
                except VmmError:
                    pass  # bound but not listening yet
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.sock.stem} never got ready: {self.log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.005)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.proc.wait(30)  # a Popen, or the fork server's ForkedVmm (same call)
        deadline = time.monotonic() + 5
        while self.cgroup and not jail.remove_cgroup(self.cgroup) and time.monotonic() < deadline:
            time.sleep(0.02)


def timed_once(tmp: Path, name: str, argv: list[str], forkserver: str | None,
               jailed: bool = False) -> tuple[float, float]:
    """(seconds to agent-ready, seconds to the first exec's answer) of one VM, which is then killed."""
    vm = Started(tmp, name, argv, forkserver, jailed)
    try:
        ready = vm.wait_ready()
        assert VmmClient(vm.sock).exec(["true"], timeout_s=60).exit_code == 0
        return ready, time.monotonic() - vm.t0
    except (AssertionError, VmmError, RuntimeError) as exc:
        time.sleep(0.5)
        console = vm.console.read_text(errors="replace")[-3000:] if vm.console.exists() else ""
        raise RuntimeError(f"{vm.sock.stem}: {exc}; its log:\n{vm.log.read_text(errors='replace')[-3000:]}\n"
                           f"its console:\n{console}") from None
    finally:
        vm.kill()


def interleaved(tmp: Path, scenarios: dict, runs: dict) -> dict:
    """Round-robin over the scenarios (name -> (argv, fork server or None[, jailed])), so that whatever else loads the
    host (the lab is shared) weighs on all of them alike. Returns name -> ([ready s], [first exec s])."""
    results = {name: ([], []) for name in scenarios}
    for round_ in range(max(runs.values())):
        progress(f"round {round_ + 1}")
        for name, (argv, server, *jailed) in scenarios.items():
            if round_ < runs[name]:
                try:
                    ready, first_exec = timed_once(tmp, f"{name.replace(' ', '-').replace(',', '')}-{round_}",
                                                   argv, server, bool(jailed and jailed[0]))
                except RuntimeError as exc:  # reported and counted; the other runs still say something
                    FAILURES.append(f"{name}, round {round_ + 1}: {str(exc)[:600]}")
                    progress(f"FAILED: {FAILURES[-1]}")
                    continue
                results[name][0].append(ready)
                results[name][1].append(first_exec)
    return results


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB figures of the whole process."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1])
    return values


def mapping_private_kib(pid: int, path_suffix: str) -> int:
    """Private_Dirty kB of the mappings of one file (a clone's guest RAM: the pages it copied)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[-1].endswith(path_suffix)
            elif inside and fields[:1] == ["Private_Dirty:"]:
                total += int(fields[1])
    return total


def progress(what: str) -> None:
    print(f"  [{time.monotonic():9.1f}] {what}", flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def line(name: str, seconds: list[float]) -> str:
    if not seconds:
        return f"  {name:<46} FAILED"
    return (f"  {name:<46} median {med(seconds) * 1000:8.1f} ms  min {min(seconds) * 1000:8.1f}  "
            f"max {max(seconds) * 1000:8.1f}  (n={len(seconds)})")


def main() -> None:
    art = guest_artifacts()
    cold = ["run", "--kernel", str(art.bzimage), "--initrd", str(art.initrd), "--cmdline", AGENT_CMDLINE,
            "--mem", str(MEM_MIB), "--vcpus", "1"]
    print(f"== clone: snapshot restore vs cold boot to agent-ready ({MEM_MIB} MiB, 1 vCPU)", flush=True)
    global JAIL_CGROUP_OK
    JAIL_CGROUP_OK = jail.cgroup_parent_ready(JAIL_CGROUP) is None
    print(f"  jailed runs: {'with' if JAIL_CGROUP_OK else 'without'} a cgroup leaf each", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name, ForkServer(Path(tmp_name)) as server, \
            ForkServer(Path(tmp_name), warm=False) as plain_forks, ForkServer(Path(tmp_name), pidns=True) as jailer:
        tmp = Path(tmp_name)
        (tmp / "template").mkdir()
        progress("booting the template")
        template = BootedVm(tmp / "template", vcpus=1, mem_mib=MEM_MIB)
        try:
            progress("snapshot")
            snap = template.client.snapshot(tmp / "snap")
            template_mem = smaps_rollup(template.proc.pid)
        finally:
            template.stop()
        progress("timed runs")
        clone = ["restore", "--from", str(tmp / "snap")]
        for path in (tmp / "snap", *(tmp / "snap").iterdir()):  # jailed clones read it as their own uids
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        scenarios = {"cold boot, fresh process": (cold, None), "cold boot, forked": (cold, server.path),
                     "cold boot, forked, jailed": (cold, jailer.path, True),
                     "clone, fresh process": (clone, None), "clone, forked": (clone, server.path),
                     "clone, forked, jailed": (clone, jailer.path, True),
                     "clone, forked, no warm VMM": (clone, plain_forks.path)}
        results = interleaved(tmp, scenarios, {name: COLD_RUNS if name.startswith("cold") else RUNS
                                               for name in scenarios})
        progress(f"{CLONES} clones at once")
        started = time.monotonic()
        many = [Started(tmp, f"many-{index:02d}", [*clone, "--hostname", f"many-{index:02d}"], server.path)
                for index in range(CLONES)]
        try:
            for vm in many:
                vm.wait_ready()
            all_ready_s = time.monotonic() - started
            for vm in many:
                try:
                    assert VmmClient(vm.sock).exec(["true"], timeout_s=60).exit_code == 0
                except (VmmError, AssertionError) as exc:  # reported with the clone's log and console
                    tails = [path.read_text(errors="replace")[-800:] for path in (vm.log, vm.console)
                             if path.exists()]
                    FAILURES.append(f"{vm.sock.stem}: `true` failed ({exc}); log and console: {tails}")
                    progress(f"FAILED: {FAILURES[-1]}")
            rollups = [smaps_rollup(vm.pid) for vm in many]
            guest_private = [mapping_private_kib(vm.pid, "/snap/memory") for vm in many]
        finally:
            for vm in many:
                vm.kill()

    print(f"  snapshot of the template: paused {snap['paused_ms']:.0f} ms, {snap['memory_written'] >> 20} MiB of "
          f"{MEM_MIB} MiB written", flush=True)
    ratios = {}
    for index, what in enumerate(("to agent-ready", "to the first exec answered (`true`)")):
        print(f"  {what}:")
        for name, seconds in results.items():
            print(line(name, seconds[index]), flush=True)
        for name, (cold_name, clone_name) in {
                "fresh process": ("cold boot, fresh process", "clone, fresh process"),
                "forked": ("cold boot, forked", "clone, forked"),
                "cold fresh process / clone forked": ("cold boot, fresh process", "clone, forked"),
                "forked, jailed": ("cold boot, forked, jailed", "clone, forked, jailed")}.items():
            ratios[f"{name}, {what}"] = med(results[cold_name][index]) / med(results[clone_name][index])
            print(f"    speed-up cold / clone, {name}: {ratios[f'{name}, {what}']:.1f}x   (goal >= 20x)")
        for kind, goal in (("cold boot", "within noise"), ("clone", "goal <= +5 %")):
            on, off = med(results[f"{kind}, forked, jailed"][index]), med(results[f"{kind}, forked"][index])
            ratios[f"jail cost, {kind}, {what}"] = on / off
            print(f"    jail on / off, {kind} forked: {on / off:.3f}x ({(on - off) * 1000:+.0f} ms; {goal})")

    def mib(key: str) -> float:
        return med([r.get(key, 0) for r in rollups]) / 1024
    private = [(r.get("Private_Dirty", 0) + r.get("Private_Clean", 0)) / 1024 for r in rollups]
    print(f"  {CLONES} clones (forked) all ready in {all_ready_s:.2f} s; per clone (median): Rss {mib('Rss'):.1f} MiB, "
          f"Pss {mib('Pss'):.1f} MiB, Private {med(private):.1f} MiB (max {max(private):.1f}; goal <= 8), "
          f"of which guest RAM copied {med(guest_private) / 1024:.2f} MiB", flush=True)
    print(f"  cold-booted template for comparison: Rss {template_mem.get('Rss', 0) / 1024:.1f} MiB, "
          f"Pss {template_mem.get('Pss', 0) / 1024:.1f} MiB, "
          f"Private {(template_mem.get('Private_Dirty', 0) + template_mem.get('Private_Clean', 0)) / 1024:.1f} MiB")
    record = {"mem_mib": MEM_MIB, "snapshot": snap, "seconds_ready_and_first_exec": results, "ratios": ratios,
              "clones": {"count": CLONES, "all_ready_s": all_ready_s, "rollup_kib": rollups,
                         "guest_private_kib": guest_private}, "template_rollup_kib": template_mem}
    record["failures"] = FAILURES
    (results_dir() / "clone.json").write_text(json.dumps(record, indent=1))
    if FAILURES:
        print(f"  {len(FAILURES)} run(s) FAILED (the medians above leave them out):", *FAILURES, sep="\n    ")
        sys.exit(1)


if __name__ == "__main__":
    main()
