"""RunSpec: what one VM is — built once (from `python -m hypervisor run|restore` options, from pclited's Launcher or
from a fork-server request), then handed to hypervisor/builder.py, never patched as an argv list.

  RunSpec.from_argv(["run", "--kernel", K, ...])   the CLI's options (usage errors raise UsageError)
  spec.to_argv()                                   the same options again: a fresh VMM process's command line
  spec.to_json() / RunSpec.from_json(text)         the fork server's wire (validated: unknown keys, wrong types)
  spec.host_files()                                every host path the VMM touches (the jail's file list)
  spec.images_key()                                what a boot loads: images loaded ahead serve an equal key

A plain frozen class with __slots__, not a dataclass: importing dataclasses (inspect, re...) costs ~0.2 s of VMM
start-up in the lab, and tests/unit/test_vmm_startup.py guards the run path against it.
"""

from __future__ import annotations

from hypervisor.cli_args import REQUIRED, UsageError, parse_options

RUN, RESTORE = "run", "restore"
DEFAULT_CMDLINE = "console=ttyS0 panic=-1"
DEFAULT_MEM_MIB = 256
MAX_JSON = 64 << 10  # a spec on the fork server's wire: paths and a command line, never more
DRIVE_SLOTS = ("rootfs",)  # the VMM's virtio-blk slots (hypervisor/boot_images.py VIRTIO_SLOTS)

_COMMON = {"--api-sock": (str, None), "--detach": (bool, False), "--console": (str, "-"), "--timeline": (bool, False),
           "--rootfs": (str, None), "--rootfs-read-only": (bool, False)}
RUN_OPTIONS = {"--kernel": (str, REQUIRED), "--initrd": (str, None), "--cmdline": (str, DEFAULT_CMDLINE),
               "--mem": (int, DEFAULT_MEM_MIB), "--vcpus": (int, 1), "--boot": (str, "auto"), **_COMMON}
RESTORE_OPTIONS = {"--from": (str, REQUIRED), "--hostname": (str, None), **_COMMON}


class Drive:
    """A disk in a virtio-blk slot: its backing file and whether the guest may write it."""
    __slots__ = ("slot", "path", "read_only")

    def __init__(self, slot: str, path: str, read_only: bool = False):
        if slot not in DRIVE_SLOTS:
            raise UsageError(f"drive slot must be one of {', '.join(DRIVE_SLOTS)}, got {slot!r}")
        _check(str, path, "drive path")
        _check(bool, read_only, "drive read_only")
        object.__setattr__(self, "slot", slot)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "read_only", read_only)

    def __setattr__(self, name, value):
        raise AttributeError("a Drive is frozen")

    def as_dict(self) -> dict:
        return {"slot": self.slot, "path": self.path, "read_only": self.read_only}

    def __eq__(self, other) -> bool:
        return isinstance(other, Drive) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.slot, self.path, self.read_only))

    def __repr__(self) -> str:
        return f"Drive({self.slot!r}, {self.path!r}, read_only={self.read_only})"


class HostFile:
    """One host path a VMM needs: `what` it is, and whether the VMM writes it (a jail mounts it so)."""
    __slots__ = ("path", "what", "writable", "is_dir")

    def __init__(self, path: str, what: str, writable: bool = False, is_dir: bool = False):
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "what", what)
        object.__setattr__(self, "writable", writable)
        object.__setattr__(self, "is_dir", is_dir)

    def __setattr__(self, name, value):
        raise AttributeError("a HostFile is frozen")

    def __eq__(self, other) -> bool:
        return isinstance(other, HostFile) and (self.path, self.what, self.writable, self.is_dir) == \
            (other.path, other.what, other.writable, other.is_dir)

    def __hash__(self) -> int:
        return hash((self.path, self.what, self.writable, self.is_dir))

    def __repr__(self) -> str:
        return f"HostFile({self.path!r}, {self.what!r}, writable={self.writable}, is_dir={self.is_dir})"


# field -> (types accepted, applies to: run / restore / both); None is accepted where the default is None
FIELDS = {
    "command": ((str,), "both"),
    "kernel": ((str,), RUN), "initrd": ((str, type(None)), RUN), "cmdline": ((str,), RUN),
    "mem_mib": ((int,), RUN), "vcpus": ((int,), RUN), "boot": ((str,), RUN),
    "snapshot": ((str,), RESTORE), "hostname": ((str, type(None)), RESTORE),
    "console": ((str,), "both"), "drives": ((tuple,), "both"), "api_sock": ((str, type(None)), "both"),
    "detach": ((bool,), "both"), "timeline": ((bool,), "both"),
}


def _check(types, value, name: str) -> None:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise UsageError(f"{name} must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
    if isinstance(value, str) and "\0" in value:
        raise UsageError(f"{name} must not contain a NUL byte")


class RunSpec:
    """One VM: a cold boot (`command` "run": kernel, initrd, cmdline, mem_mib, vcpus, boot) or a clone of a snapshot
    (`command` "restore": snapshot, hostname; its size is the snapshot's), plus what both have: console ("-" for
    stdout, "none", or a file), drives, api_sock, detach, timeline. Frozen; replace() makes a changed copy."""
    __slots__ = tuple(FIELDS)

    def __init__(self, command: str, *, kernel: str | None = None, initrd: str | None = None,
                 cmdline: str = DEFAULT_CMDLINE, mem_mib: int = DEFAULT_MEM_MIB, vcpus: int = 1, boot: str = "auto",
                 snapshot: str | None = None, hostname: str | None = None, console: str = "-",
                 drives: tuple[Drive, ...] = (), api_sock: str | None = None, detach: bool = False,
                 timeline: bool = False):
        values = {"command": command, "kernel": kernel, "initrd": initrd, "cmdline": cmdline, "mem_mib": mem_mib,
                  "vcpus": vcpus, "boot": boot, "snapshot": snapshot, "hostname": hostname, "console": console,
                  "drives": tuple(drives), "api_sock": api_sock, "detach": detach, "timeline": timeline}
        if command not in (RUN, RESTORE):
            raise UsageError(f"a VM is started by `run` or `restore`, not {command!r}")
        for name, (types, applies) in FIELDS.items():
            if applies in ("both", command):
                _check(types, values[name], name)
            else:  # the other command's fields: left at their defaults, so two equal VMs compare equal
                values[name] = None
        if command == RUN:
            from guestboot.loader import BOOT_MODES
            if values["boot"] not in BOOT_MODES:
                raise UsageError(f"--boot must be one of {', '.join(BOOT_MODES)}, got {values['boot']!r}")
        for drive in values["drives"]:
            if not isinstance(drive, Drive):
                raise UsageError(f"drives must be Drive objects, got {type(drive).__name__}")
        slots = [drive.slot for drive in values["drives"]]
        if len(set(slots)) != len(slots):
            raise UsageError(f"one drive per slot, got {slots}")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"a RunSpec is frozen: use spec.replace({name}=...)")

    def as_dict(self) -> dict:
        values = {name: getattr(self, name) for name in FIELDS
                  if FIELDS[name][1] in ("both", self.command)}
        values["drives"] = [drive.as_dict() for drive in self.drives]
        return values

    def replace(self, **changes) -> RunSpec:
        values = {name: getattr(self, name) for name in FIELDS if FIELDS[name][1] in ("both", self.command)}
        values.update(changes)
        return RunSpec(**values)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunSpec) and all(getattr(self, n) == getattr(other, n) for n in FIELDS)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in FIELDS))

    def __repr__(self) -> str:
        return f"RunSpec({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def drive(self, slot: str) -> Drive | None:
        return next((drive for drive in self.drives if drive.slot == slot), None)

    # ---- the CLI

    @classmethod
    def from_argv(cls, argv: list[str], usage: str = "") -> RunSpec:
        """From `run ...` or `restore ...` options (argv[0] is the command). Raises UsageError."""
        command = argv[0] if argv else ""
        if command not in (RUN, RESTORE):
            raise UsageError(f"a VM is started by `run` or `restore`, not {command!r}\n{usage}")
        opts = parse_options(argv[1:], RUN_OPTIONS if command == RUN else RESTORE_OPTIONS, usage)
        drives = (Drive("rootfs", opts["rootfs"], opts["rootfs_read_only"]),) if opts["rootfs"] else ()
        if opts["rootfs_read_only"] and not opts["rootfs"]:
            raise UsageError(f"--rootfs-read-only needs --rootfs PATH\n{usage}")
        common = {"console": opts["console"], "drives": drives, "api_sock": opts["api_sock"],
                  "detach": opts["detach"], "timeline": opts["timeline"]}
        if command == RUN:
            return cls(RUN, kernel=opts["kernel"], initrd=opts["initrd"], cmdline=opts["cmdline"],
                       mem_mib=opts["mem"], vcpus=opts["vcpus"], boot=opts["boot"], **common)
        return cls(RESTORE, snapshot=opts["from"], hostname=opts["hostname"], **common)

    def to_argv(self) -> list[str]:
        """The options from_argv() reads back into this spec (`hypervisor` CLI form, command first)."""
        if self.command == RUN:
            args = [RUN, "--kernel", self.kernel, *(["--initrd", self.initrd] if self.initrd else []),
                    "--cmdline", self.cmdline, "--mem", str(self.mem_mib), "--vcpus", str(self.vcpus),
                    "--boot", self.boot]
        else:
            args = [RESTORE, "--from", self.snapshot, *(["--hostname", self.hostname] if self.hostname else [])]
        if self.api_sock:
            args += ["--api-sock", self.api_sock]
        args += ["--console", self.console]
        for drive in self.drives:  # one slot today: rootfs
            args += ["--rootfs", drive.path, *(["--rootfs-read-only"] if drive.read_only else [])]
        return args + (["--timeline"] if self.timeline else []) + (["--detach"] if self.detach else [])

    # ---- the fork server's wire

    def to_json(self) -> str:
        import json
        return json.dumps(self.as_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data) -> RunSpec:
        """From to_json()'s text (or its decoded dict). Raises UsageError for anything else: not an object,
        unknown or misplaced keys, wrong types, oversized."""
        if isinstance(data, (str, bytes)):
            if len(data) > MAX_JSON:
                raise UsageError(f"a run spec is at most {MAX_JSON} bytes, got {len(data)}")
            import json
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise UsageError(f"a run spec must be JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UsageError(f"a run spec must be a JSON object, got {type(data).__name__}")
        command = data.get("command")
        if command not in (RUN, RESTORE):
            raise UsageError(f"a run spec's command must be {RUN!r} or {RESTORE!r}, got {command!r}")
        allowed = {name for name, (_, applies) in FIELDS.items() if applies in ("both", command)}
        unknown = sorted(set(data) - allowed, key=str)
        if unknown:
            raise UsageError(f"a {command} spec has no field(s) {', '.join(map(repr, unknown))}")
        values = dict(data)
        drives = values.pop("drives", [])
        if not isinstance(drives, list) or not all(isinstance(d, dict) and set(d) <= {"slot", "path", "read_only"}
                                                   for d in drives):
            raise UsageError("drives must be a list of {slot, path, read_only} objects")
        try:
            values["drives"] = tuple(Drive(d.get("slot"), d.get("path"), d.get("read_only", False)) for d in drives)
        except TypeError as exc:
            raise UsageError(f"bad drive: {exc}") from None
        del values["command"]
        return cls(command, **values)

    # ---- what the VM needs of the host

    def images_key(self) -> tuple:
        """What a cold boot loads into guest RAM: images loaded ahead (boot_images.prepare) serve an equal key."""
        return (self.kernel, self.initrd, self.cmdline, self.mem_mib, self.vcpus, self.boot)

    def host_files(self) -> list[HostFile]:
        """Every host path this VM's VMM opens, binds or writes (relative paths as given: the VMM's cwd)."""
        import os
        files = []
        if self.command == RUN:
            files.append(HostFile(self.kernel, "kernel"))
            if self.initrd:
                files.append(HostFile(self.initrd, "initrd"))
            if self.boot == "unpack":  # a bzImage unpacked on the host is kept there for the next VM
                from hypervisor.boot_images import unpacked_cache_dir
                files.append(HostFile(unpacked_cache_dir(), "unpacked-kernel-cache", writable=True, is_dir=True))
        else:  # its state.json and memory file (plain names inside the directory: hypervisor/snapshot.py)
            files.append(HostFile(self.snapshot, "snapshot", is_dir=True))
        files += [HostFile(drive.path, f"drive:{drive.slot}", writable=not drive.read_only) for drive in self.drives]
        if self.console not in ("-", "none"):
            files.append(HostFile(self.console, "console", writable=True))
        if self.api_sock:
            files.append(HostFile(os.path.dirname(self.api_sock) or ".", "api-socket-dir", writable=True,
                                  is_dir=True))
        files.append(HostFile("/dev/kvm", "kvm", writable=True))
        return files
