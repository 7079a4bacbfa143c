"""pclite-lab: run commands where real Linux guests can boot under KVM.

  pclite-lab check                       can this host's KVM boot Linux guests? (exit 0 yes, 1 no)
  pclite-lab run [opts] -- CMD ARGS...   run CMD inside the lab VM, return its exit code
                                         (--if-needed: run it directly where the host's KVM can boot Linux)
  pclite-lab test [-- PYTEST ARGS]       run the guest-marked tests here if possible, else in one lab session
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from guestbuild.cache import BuildError, cache_root
from pclitelab.assets import stock_kernel
from pclitelab.detect import host_kvm_status
from pclitelab.runner import LabError, LabFault, LabRequest, run_in_lab

GUEST_TEST_TIMEOUT_S = 600
# When the lab's own kernel panics, the tests that had not finished run in a fresh lab: up to this many labs, while
# labs keep finishing tests, and none started after the budget (CI has 90 minutes in all).
GUEST_TEST_LABS = 8
GUEST_TEST_BUDGET_S = 3600
# No test finished for this long, although pytest-timeout ends any test after GUEST_TEST_TIMEOUT_S: the lab itself is
# stuck (both its CPUs spinning in the kernel with interrupts off has been seen) and is treated as a lab fault.
LAB_STALL_S = GUEST_TEST_TIMEOUT_S + 180
PROGRESS_ENV = "PCLITE_TEST_PROGRESS"  # tests/conftest.py appends "<outcome> <node id>" there per finished test
LAB_TIMEOUT_S = {"run": 3600, "test": 2400}  # test: CI has 90 minutes in all


def _forward(text: str) -> tuple[int, int]:
    host, _, guest = text.partition(":")
    try:
        return int(host), int(guest or host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--forward wants HOSTPORT:GUESTPORT, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pclite-lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="say whether this host's KVM can boot Linux guests, and why")
    for name in ("run", "test"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--mem", type=int, default=4096, help="lab VM memory in MiB (default 4096)")
        cmd.add_argument("--cpus", type=int, default=2, help="lab VM vCPUs (default 2)")
        cmd.add_argument("--timeout", type=float, default=LAB_TIMEOUT_S[name],
                         help=f"seconds before the lab is stopped, 0 for no limit (default {LAB_TIMEOUT_S[name]})")
        cmd.add_argument("--forward", type=_forward, action="append", default=[], metavar="HOSTPORT:GUESTPORT",
                         help="forward 127.0.0.1:HOSTPORT on the host to GUESTPORT in the lab")
        cmd.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    sub.choices["run"].add_argument("--if-needed", action="store_true",
                                    help="run CMD directly when this host's KVM can boot Linux guests")
    return parser


def _request(args, argv: list[str], env: dict[str, str] | None = None, stalled=None) -> LabRequest:
    return LabRequest(command=argv, workdir=Path.cwd(), mem_mib=args.mem, cpus=args.cpus,
                      timeout_s=args.timeout, forwards=args.forward, env=env or {}, stalled=stalled)


def stall_watch(progress: Path, limit_s: float = LAB_STALL_S):
    """A LabRequest.stalled check: a reason once neither the lab started nor a test finished for limit_s."""
    last = {"size": -1, "since": time.monotonic()}

    def stalled() -> str | None:
        try:
            size = progress.stat().st_size
        except OSError:
            size = 0
        now = time.monotonic()
        if size != last["size"]:
            last.update(size=size, since=now)
        elif now - last["since"] > limit_s:
            return f"no test finished for {now - last['since']:.0f} s, longer than any test may take"
        return None
    return stalled


def _run_lab(args, argv: list[str]) -> int:
    """Once: a command that is not a test session (a benchmark, a service) is never silently run twice."""
    started = time.monotonic()
    try:
        code = run_in_lab(_request(args, argv))
    except (LabError, BuildError) as exc:
        print(f"pclite-lab: error: {exc}", file=sys.stderr)
        return 125
    print(f"pclite-lab: command exited {code} after {time.monotonic() - started:.1f}s in the lab", file=sys.stderr)
    return code


def finished_tests(progress: Path) -> dict[str, str]:
    """Node id → outcome of every test that finished in an earlier lab ("failed" sticks)."""
    finished: dict[str, str] = {}
    if progress.exists():
        for line in progress.read_text(errors="replace").splitlines():
            outcome, _, node_id = line.partition(" ")
            if node_id and finished.get(node_id) != "failed":
                finished[node_id] = outcome
    return finished


def _run_tests_in_lab(args, pytest_argv: list[str], labs: int = GUEST_TEST_LABS) -> int:
    """A test session that survives the lab's own faults: the nested KVM of the lab (kvm-amd under TCG) has
    crashed now and then (stack corruption inside KVM_RUN, stray NMIs) or stalled. Then a fresh lab runs the tests
    that had not finished; finished ones keep their outcome, so a failure is never retried away."""
    started = time.monotonic()
    (cache_root() / "lab").mkdir(parents=True, exist_ok=True)
    progress_dir = Path(tempfile.mkdtemp(prefix="progress-", dir=cache_root() / "lab"))  # inside a lab share
    progress = progress_dir / "finished"
    stalled = 0  # labs in a row that finished no test
    try:
        for lab in range(1, labs + 1):
            earlier = finished_tests(progress)
            argv = pytest_argv + [f"--deselect={node_id}" for node_id in earlier]
            try:
                code = run_in_lab(_request(args, argv, env={PROGRESS_ENV: str(progress)},
                                           stalled=stall_watch(progress)))
            except LabFault as exc:
                done = finished_tests(progress)
                failed = sum(outcome == "failed" for outcome in done.values())
                kept = f"{len(done)} finished test(s) keep their outcome ({failed} failed)"
                stalled = 0 if len(done) > len(earlier) else stalled + 1
                why = ("two labs in a row finished no test" if stalled >= 2 else f"{labs} labs" if lab == labs else
                       f"{GUEST_TEST_BUDGET_S}s" if time.monotonic() - started > GUEST_TEST_BUDGET_S else None)
                if why:
                    print(f"pclite-lab: error: {exc}; gave up after {lab} lab(s) ({why}); {kept}", file=sys.stderr)
                    return 125
                print(f"pclite-lab: {exc}; {kept}; the others run in a fresh lab (lab {lab + 1} of at most "
                      f"{labs})", file=sys.stderr, flush=True)
                continue
            except (LabError, BuildError) as exc:
                print(f"pclite-lab: error: {exc}", file=sys.stderr)
                return 125
            if lab > 1:
                failed_earlier = sorted(node for node, outcome in earlier.items() if outcome == "failed")
                if code == 5 and earlier:
                    code = 0  # every test had finished before the panic
                if failed_earlier and code == 0:
                    code = 1
                print(f"pclite-lab: the tests ran in {lab} labs; {len(earlier)} finished in earlier ones"
                      + (f", failed there: {', '.join(failed_earlier)}" if failed_earlier else ""), file=sys.stderr)
            print(f"pclite-lab: tests exited {code} after {time.monotonic() - started:.1f}s in the lab",
                  file=sys.stderr)
            return code
    finally:
        shutil.rmtree(progress_dir, ignore_errors=True)
    return 125


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        ok, reason = host_kvm_status()
        print(("yes: " if ok else "no: ") + reason)
        return 0 if ok else 1
    rest = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if args.command == "run":
        if not rest:
            print("pclite-lab: error: nothing to run; usage: pclite-lab run -- CMD ARGS...", file=sys.stderr)
            return 2
        ok, reason = host_kvm_status()
        if args.if_needed and ok:
            return subprocess.call(rest)
        return _run_lab(args, rest)
    # -v names each test as it starts (a hang is attributable); the thread method ends a stuck test even when it
    # is blocked in a system call, where the signal method cannot.
    pytest = [sys.executable, "-m", "pytest", "-m", "guest", "-v", "--timeout", str(GUEST_TEST_TIMEOUT_S),
              "--timeout-method", "thread", "--durations", "10", *rest]
    try:
        stock_kernel()  # fetched before the tests: the lab has no network
    except BuildError as exc:
        print(f"pclite-lab: error: {exc}", file=sys.stderr)
        return 125
    ok, reason = host_kvm_status()
    if ok:
        print(f"pclite-lab: guest tests run directly: {reason}", file=sys.stderr)
        return subprocess.call(pytest)
    print(f"pclite-lab: guest tests run inside the lab: {reason}", file=sys.stderr)
    return _run_tests_in_lab(args, pytest)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
