"""What syscalls a VMM really makes, before and after its seccomp install point: the evidence behind
hypervisor/seccomp_filter.py's lists. Not a test: a tool, run in the lab as root with strace installed:

  .venv/bin/pclite-lab run -- .venv/bin/python -m tests.guest.seccomp_learn OUTDIR

It runs the workloads of tests/guest/test_seccomp.py (cold boot + execs + container paths + snapshot, restore,
a fork-server clone) with the filter installed in log mode (nothing is killed; the kernel logs what would have
been) under `strace -f`, then prints per workload: syscalls seen only before the install point, syscalls after
it with counts, and those after it that the filter would deny.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

from hypervisor import seccomp_filter
from tests.guest import test_seccomp as T

LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")
RESULT = re.compile(r"=\s+(-?\d+)")


def parse(trace: Path) -> dict:
    """{tgid: {"before": Counter, "after": Counter}} with a process's threads folded into it."""
    tgid: dict[int, int] = {}
    installed: set[int] = set()
    pending: dict[int, tuple[str, str]] = {}
    seen: dict[int, dict] = collections.defaultdict(lambda: {"before": collections.Counter(),
                                                             "after": collections.Counter(),
                                                             "ioctls": collections.Counter()})
    for raw in trace.read_text(errors="replace").splitlines():
        m = LINE.match(raw)
        if not m:
            continue
        pid = int(m.group(1))
        name = m.group(2) or m.group(3)
        rest = m.group(4)
        group = tgid.setdefault(pid, pid)
        if m.group(3) and rest.endswith("<unfinished ...>"):
            pending[pid] = (name, rest)
            continue
        args = pending.pop(pid, (name, ""))[1] + rest if m.group(2) else rest
        seen[group]["after" if group in installed else "before"][name] += 1
        if name == "ioctl" and group in installed:
            seen[group]["ioctls"][args.split(", ")[1] if ", " in args else args] += 1
        if name in ("clone", "clone3", "fork", "vfork") and (r := RESULT.search(rest)) and int(r.group(1)) > 0:
            child = int(r.group(1))
            tgid[child] = group if "CLONE_THREAD" in args else child
        if name == "seccomp" and "SECCOMP_SET_MODE_FILTER" in args and rest.rstrip().endswith("= 0"):
            installed.add(group)
    return {g: v for g, v in seen.items() if g in installed}


def report(name: str, trace: Path) -> dict:
    allowed = set(seccomp_filter.ALLOWED) | {"ioctl", "clone", "clone3", "tgkill", "socket"}
    processes = parse(trace)
    before, after, ioctls = collections.Counter(), collections.Counter(), collections.Counter()
    for counts in processes.values():
        before.update(counts["before"])
        after.update(counts["after"])
        ioctls.update(counts["ioctls"])
    listed = set(seccomp_filter.KVM_IOCTLS) | set(seccomp_filter.OTHER_IOCTLS)
    summary = {"workload": name, "filtered_processes": len(processes),
               "only_before_install": sorted(set(before) - set(after)),
               "after_install": dict(after.most_common()),
               "after_install_not_allowed": sorted(set(after) - allowed),
               "ioctls_after_install": dict(ioctls.most_common()),
               "ioctls_not_listed": sorted(set(ioctls) - listed)}
    print(json.dumps(summary), flush=True)
    return summary


def main(out: str) -> int:
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dmesg", "-C"], check=False)
    T.READY_S = 900  # strace slows a boot in the lab several times over

    def traced(name: str) -> Path:
        path = out_dir / f"{name}.trace"
        T.WRAP[:] = ["strace", "-f", "-qq", "-o", str(path)]
        return path

    cold_trace = traced("cold")
    vmm = T.cold_boot(out_dir / "cold", action="log")
    T.run_execs(vmm)
    T.run_container(vmm, out_dir / "container")
    T.snapshot(vmm, out_dir / "snap")
    vmm.client.action("shutdown")
    vmm.proc.wait(300)
    report("cold boot, execs, container, snapshot, shutdown", cold_trace)

    restore_trace = traced("restore")
    clone = T.restore(out_dir / "clone", out_dir / "snap", action="log")
    T.run_execs(clone)
    clone.client.action("shutdown")
    clone.proc.wait(300)
    report("restore, execs, shutdown", restore_trace)

    fork_trace = traced("fork")
    server = T.ForkServer(out_dir / "fork", action="log")
    child, client = server.clone("fork1", out_dir / "snap")
    client.exec(["uname", "-a"])
    client.action("shutdown")
    child.wait(300)
    server.close()
    report("fork-server clone, exec, shutdown", fork_trace)

    logged = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    calls = collections.Counter(re.findall(r"type=1326.* syscall=(\d+)", logged))
    seccomp = seccomp_filter.bindings()
    print(json.dumps({"kernel_logged_would_deny": {seccomp.resolve_syscall(seccomp.Arch(), int(n)).decode(): c
                                                   for n, c in calls.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "seccomp-learn"))
