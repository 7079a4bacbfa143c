"""pclite VMM: one microVM per process.

  python -m hypervisor run --kernel PATH [--initrd PATH] [--cmdline STR] [--mem MiB] [--vcpus N]
                           [--console -|FILE|none] [--boot auto|pvh|bzimage|unpack|elf64] [--timeline]
                           [--api-sock PATH [--detach]] [--rootfs PATH [--rootfs-read-only]]
  python -m hypervisor exec --api-sock PATH [--timeout S] [--cwd DIR] -- CMD ARGS...
  python -m hypervisor forkserver --socket PATH     (pre-imported; forks a VMM per request)
  python -m hypervisor snapshot --api-sock PATH --out DIR [--paused]
  python -m hypervisor restore --from DIR [--api-sock PATH [--detach]] [--console -|FILE|none] [--hostname NAME]
                               [--timeline] [--rootfs PATH [--rootfs-read-only]]

run: one VM in the foreground; exits 0 when the guest powers off or reboots, nonzero when it fails.
--boot: auto (PVH for an ELF with the note, else its 64-bit entry; a bzImage via its 64-bit entry),
pvh, bzimage (64-bit entry at +0x200), unpack (decompress a bzImage on the host, then PVH), elf64 (an ELF's
64-bit entry). --rootfs: a disk in the rootfs slot (else an empty one until PUT /drives/rootfs).
--api-sock: serve the control API (GET /status, POST /exec, PUT /actions, GET /console) on that Unix
socket; the VMM then stops when its parent process exits, unless --detach.
exec: run CMD in the guest through its agent; prints its stdout/stderr and exits with its exit code
(stdin is passed when it is not a terminal).
snapshot: pause the VM behind --api-sock, write its state and RAM to DIR, resume it (unless --paused).
restore: run a clone of the snapshot in DIR (no kernel is loaded; RAM is DIR/memory, copy-on-write); the agent
is ready at once, with fresh entropy, the current time and its own host name (--hostname, else a random one).
Its disks are this command's (--rootfs), never the snapshot's. A snapshot from another format version, a
corrupted or forged one, or one from a different host is refused (exit 1).
"""

import os
import sys

from hypervisor.cli_args import REQUIRED, UsageError, parse_options

SNAPSHOT_OPTIONS = {"--api-sock": (str, REQUIRED), "--out": (str, REQUIRED), "--paused": (bool, False)}
EXEC_OPTIONS = {"--api-sock": (str, REQUIRED), "--timeout": (float, None), "--cwd": (str, "/")}


def cmd_vm(argv: list[str]) -> int:
    """`run` or `restore` (argv[0]): one RunSpec from the options, run by the builder."""
    from hypervisor.builder import run
    from hypervisor.runspec import RunSpec
    from hypervisor.timeline import Timeline
    return run(RunSpec.from_argv(argv, __doc__), Timeline())  # the timeline starts at this process's start


def cmd_snapshot(argv: list[str]) -> int:
    opts = parse_options(argv, SNAPSHOT_OPTIONS, __doc__)
    import json

    from hypervisor.client import VmmClient, VmmError
    try:  # an absolute path: the VMM's working directory is not ours
        summary = VmmClient(opts["api_sock"]).snapshot(os.path.abspath(opts["out"]), resume=not opts["paused"])
    except VmmError as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def cmd_exec(argv: list[str]) -> int:
    split = next((i for i, arg in enumerate(argv) if arg == "--"), len(argv))
    opts = parse_options(argv[:split], EXEC_OPTIONS, __doc__)
    command = argv[split + 1:]
    if not command:
        raise UsageError(f"nothing to run: give the command after --\n{__doc__}")
    from hypervisor.client import VmmClient, VmmError
    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    try:
        result = VmmClient(opts["api_sock"]).exec(command, stdin=stdin, cwd=opts["cwd"], timeout_s=opts["timeout"],
                                                  output_cap=0)
    except VmmError as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        return 125
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    if result.timed_out:
        print(f"pclite: {command[0]} timed out after {opts['timeout']} s and was killed", file=sys.stderr)
        return 124
    if result.signal is not None:
        print(f"pclite: {command[0]} was killed by signal {result.signal}", file=sys.stderr)
        return 128 + result.signal
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] in (["run"], ["restore"]):
            return cmd_vm(argv)
        if argv[:1] == ["exec"]:
            return cmd_exec(argv[1:])
        if argv[:1] == ["snapshot"]:
            return cmd_snapshot(argv[1:])
        if argv[:1] == ["forkserver"]:
            from hypervisor.forkserver import serve
            return serve(argv[1:])
        raise UsageError(__doc__)
    except UsageError as exc:
        print(f"pclite: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
