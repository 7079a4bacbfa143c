"""pclite VMM: one microVM per process.

  python -m hypervisor run --kernel PATH [--initrd PATH] [--cmdline STR] [--mem MiB] [--vcpus N]
                           [--console -|FILE|none] [--boot auto|pvh|bzimage|unpack] [--timeline]

Runs one VM in the foreground; exits 0 when the guest powers off or reboots, nonzero when it fails.
--boot: auto (PVH for an ELF with the note, else its 64-bit entry; a bzImage via its 64-bit entry),
pvh, bzimage (64-bit entry at +0x200), unpack (decompress a bzImage on the host, then PVH).
"""

from hypervisor.timeline import Timeline

TIMELINE = Timeline()  # first thing: everything after process start is VMM cost

import os  # noqa: E402
import sys  # noqa: E402

from hypervisor.cli_args import REQUIRED, UsageError, parse_options  # noqa: E402

RUN_OPTIONS = {
    "--kernel": (str, REQUIRED), "--initrd": (str, None), "--cmdline": (str, "console=ttyS0 panic=-1"),
    "--mem": (int, 256), "--vcpus": (int, 1), "--console": (str, "-"), "--boot": (str, "auto"),
    "--timeline": (bool, False),
}


def _console_sink(target: str):
    if target == "none":
        return None
    fd = sys.stdout.fileno() if target == "-" else os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return lambda data: os.write(fd, data)


def cmd_run(argv: list[str]) -> int:
    opts = parse_options(argv, RUN_OPTIONS, __doc__)
    if opts["boot"] not in ("auto", "pvh", "bzimage", "unpack"):
        raise UsageError(f"--boot must be auto, pvh, bzimage or unpack, got {opts['boot']!r}")
    from hypervisor.vm import KvmError, LoaderError, Machine, MachineConfig, VmConfigError
    TIMELINE.mark("vmm_ready")
    config = MachineConfig(kernel=opts["kernel"], initrd=opts["initrd"], cmdline=opts["cmdline"],
                           mem_mib=opts["mem"], vcpus=opts["vcpus"], boot=opts["boot"],
                           console_sink=_console_sink(opts["console"]))
    try:
        machine = Machine(config, TIMELINE)  # validates the config
    except VmConfigError as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        return 1
    try:
        machine.build()
        machine.start()
        code = machine.wait()
    except (VmConfigError, LoaderError, KvmError, OSError) as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        machine.close()
        return 1
    except KeyboardInterrupt:
        machine.stop("interrupted (Ctrl-C)", 130)
        code = 130
    print(f"pclite: VM stopped: {machine.stop_reason}", file=sys.stderr)
    if opts["timeline"]:
        import json
        print(json.dumps({"timeline_ms": TIMELINE.as_ms(), "exits": machine.exit_counts(),
                          "boot": machine.plan.kernel_format, "exit_code": code,
                          "reason": machine.stop_reason}), file=sys.stderr)
    machine.close()
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["run"]:
            return cmd_run(argv[1:])
        raise UsageError(__doc__)
    except UsageError as exc:
        print(f"pclite: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
