"""pclite-lab: run commands where real Linux guests can boot under KVM.

  pclite-lab check                       can this host's KVM boot Linux guests? (exit 0 yes, 1 no)
  pclite-lab run [opts] -- CMD ARGS...   run CMD inside the lab VM, return its exit code
                                         (--if-needed: run it directly where the host's KVM can boot Linux)
  pclite-lab test [-- PYTEST ARGS]       run the guest-marked tests here if possible, else in one lab session
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from guestboot.cache import BuildError
from guestboot.lab.assets import stock_kernel
from guestboot.lab.detect import host_kvm_status
from guestboot.lab.runner import LabError, LabKernelPanic, LabRequest, run_in_lab

GUEST_TEST_TIMEOUT_S = 600
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


def _run_lab(args, argv: list[str], attempts: int = 1) -> int:
    """`attempts` > 1: run again in a fresh lab when the lab's own kernel panicked (not when the command
    failed): the nested KVM of the lab (kvm-amd under TCG) has crashed that way now and then."""
    request = LabRequest(command=argv, workdir=Path.cwd(), mem_mib=args.mem, cpus=args.cpus,
                         timeout_s=args.timeout, forwards=args.forward)
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            code = run_in_lab(request)
            break
        except LabKernelPanic as exc:
            if attempt == attempts:
                print(f"pclite-lab: error: {exc}; gave up after {attempts} lab(s)", file=sys.stderr)
                return 125
            print(f"pclite-lab: {exc}; running it again in a fresh lab (attempt {attempt + 1} of {attempts})",
                  file=sys.stderr, flush=True)
        except (LabError, BuildError) as exc:
            print(f"pclite-lab: error: {exc}", file=sys.stderr)
            return 125
    print(f"pclite-lab: command exited {code} after {time.monotonic() - started:.1f}s in the lab", file=sys.stderr)
    return code


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
    return _run_lab(args, pytest, attempts=2)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
