"""A jail per VMM (Firecracker's jailer, in-process): what a VMM may reach once a guest has broken into it.

`enter(plan)` runs in the VMM process itself, as root, while it is still single-threaded (unshare(CLONE_NEWNS)
would move the calling thread alone, leaving the others the host's view) and before the guest runs:

1. a cgroup v2 leaf of its own (memory.max, pids.max, cpu.weight), joined;
2. new mount, network, IPC and UTS namespaces; in the mount namespace a fresh tmpfs holding only the plan's paths,
   bind-mounted at their host paths (read-only or read-write), `/dev/kvm` made for the VM's uid, then
   `pivot_root` into it: pclited's data dir, token, database and other VMs' sockets do not exist there;
3. the VM's own uid/gid with no supplementary groups (setresuid away from root clears every capability), and
   no_new_privs.

A pid namespace only applies to children: `pid_namespace_for_next_child()` wraps the fork (fork server) or the
spawn (pclited) that makes the VMM, which then is pid 1 of its own namespace. Files opened before `enter` stay
usable, so the caller opens or imports whatever it can beforehand.

Plain values in, one line out on failure (JailError); the service decides per feature what is on
(`available_features()`), and a plan carries only those.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155  # x86_64
FEATURES = ("uid", "mountns", "pidns", "netns", "cgroup", "seccomp")
CGROUP_ROOT = "/sys/fs/cgroup"
SHARED_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")  # harmless, and an empty drive slot is /dev/null
CGROUP_CONTROLLERS = ("memory", "pids", "cpu")


class JailError(Exception):
    """The jail could not be set up; the message says which step and what to change."""


class JailPlan:
    """One VMM's jail, from plain values (JSON-able: it travels in the fork request or the VMM's environment).

    root: an empty host directory the jail's tmpfs is mounted on (in the jail's mount namespace only).
    read_only / read_write: host paths bound at the same path inside (files or directories; missing ones skipped).
    binds: (host source, path inside) pairs, read-write: e.g. a per-VM socket directory shown at the path where
    the VMM binds its API socket. owned: host paths chowned to uid:gid first (what the VMM must write).
    cgroup: the leaf's path (None: no cgroup); mount / net: those namespaces on or off (a service without the
    privilege turns them off and says so); seccomp: the VMM installs hypervisor/seccomp_filter.py as the jail's
    last step, once its VM exists (hypervisor/builder.py), not here. A plain class, not a dataclass: importing
    dataclasses costs VMM start-up.
    """

    FIELDS = {"vm_id": None, "uid": None, "gid": None, "root": None, "read_only": (), "read_write": (), "binds": (),
              "owned": (), "cgroup": None, "memory_max": None, "pids_max": None, "cpu_weight": None, "mount": True,
              "net": True, "devices": ("/dev/kvm",), "seccomp": False}
    __slots__ = tuple(FIELDS)

    def __init__(self, **values):
        unknown = set(values) - set(self.FIELDS)
        if unknown:
            raise JailError(f"bad jail plan: no field(s) {', '.join(sorted(unknown))}")
        for name, default in self.FIELDS.items():
            value = values.get(name, default)
            if name == "binds":
                value = tuple((str(a), str(b)) for a, b in value)
            elif isinstance(default, tuple):
                value = tuple(str(v) for v in value)
            setattr(self, name, value)
        if not isinstance(self.uid, int) or not isinstance(self.gid, int) or self.uid <= 0 or self.gid <= 0:
            raise JailError(f"jail uid/gid must be non-root ids, got {self.uid}/{self.gid}")
        if not isinstance(self.vm_id, str) or not isinstance(self.root, str):
            raise JailError("a jail plan needs vm_id and root")
        paths = (self.root, *self.read_only, *self.read_write, *self.owned, *(p for pair in self.binds for p in pair),
                 *((self.cgroup,) if self.cgroup else ()))
        for path in paths:
            if not path.startswith("/") or "/../" in path + "/":
                raise JailError(f"jail path {path!r} must be absolute, without '..'")

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JailPlan:
        try:
            raw = json.loads(text)
            return cls(**raw)
        except (TypeError, ValueError, AttributeError) as exc:
            raise JailError(f"bad jail plan ({exc}): it is made by pclited, not by hand") from None


# --- syscalls (Python 3.11 has no os.unshare/setns/mount) ---------------------------------------------------------
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(f"jail: {what}: {os.strerror(err)} (errno {err})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None
    _check(_c().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or ''} on {target}")


def unshare(flags: int, what: str = "unshare") -> None:
    _check(_c().unshare(ctypes.c_int(flags)), what)


def setns(fd: int, nstype: int) -> None:
    _check(_c().setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


class pid_namespace_for_next_child:  # noqa: N801 - used as a context manager, like a function
    """`with pid_namespace_for_next_child(): fork or spawn once` — that child is pid 1 of a new pid namespace.

    The caller's own pid namespace is restored for its later children (setns to /proc/self/ns/pid). Per thread:
    other threads of the caller are not affected. Disabled (enabled=False): does nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled, self._own = enabled, -1

    def __enter__(self):
        if self.enabled:
            self._pid = os.getpid()
            self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                unshare(CLONE_NEWPID, "unshare a pid namespace")
            except BaseException:
                os.close(self._own)
                raise
        return self

    def __exit__(self, *exc):
        if self._own >= 0:
            try:
                if os.getpid() == self._pid:  # not in the child, which is inside the new namespace
                    setns(self._own, CLONE_NEWPID)
            finally:
                os.close(self._own)
                self._own = -1


# --- cgroup v2 ----------------------------------------------------------------------------------------------------
def cgroup2_mount() -> str | None:
    """Where cgroup v2 is mounted (the unified hierarchy), or None."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1].replace("\\040", " ")
    except OSError:
        pass
    return None


def cgroup_parent_ready(parent: str) -> str | None:
    """Create `parent` (e.g. /sys/fs/cgroup/pclite) with the memory, pids and cpu controllers enabled for its leaves.
    None when ready, else why not (one line)."""
    base = cgroup2_mount()
    if base is None:
        return "no cgroup v2 mounted"
    if not (parent + "/").startswith(base.rstrip("/") + "/"):
        return f"{parent} is not under the cgroup v2 mount {base}"
    try:
        os.makedirs(parent, exist_ok=True)
        chain = [base.rstrip("/")]
        for part in os.path.relpath(parent, base).split("/"):
            chain.append(chain[-1] + "/" + part)
        for directory in chain[:-1] + [parent]:
            with open(os.path.join(directory, "cgroup.controllers")) as f:
                have = set(f.read().split())
            missing = [c for c in CGROUP_CONTROLLERS if c not in have]
            if missing:
                return f"cgroup {directory} lacks the {', '.join(missing)} controller(s) (not delegated)"
            with open(os.path.join(directory, "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
            if not enabled.issuperset(CGROUP_CONTROLLERS):  # only then: a parent may be read-only to us
                with open(os.path.join(directory, "cgroup.subtree_control"), "w") as f:
                    f.write(" ".join("+" + c for c in CGROUP_CONTROLLERS))
    except OSError as exc:
        return f"cannot set up cgroup {parent}: {exc.strerror or exc}"
    return None


def _join_cgroup(plan: JailPlan) -> None:
    try:
        os.makedirs(plan.cgroup, exist_ok=True)
        for name, value in (("memory.max", plan.memory_max), ("pids.max", plan.pids_max),
                            ("cpu.weight", plan.cpu_weight)):
            if value is not None:
                with open(os.path.join(plan.cgroup, name), "w") as f:
                    f.write(str(value))
        with open(os.path.join(plan.cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    except OSError as exc:
        raise JailError(f"jail: cgroup {plan.cgroup}: {exc.strerror or exc}") from None


def remove_cgroup(path: str) -> bool:
    """Remove a VM's cgroup leaf once its processes are gone (rmdir; a live one refuses with EBUSY). True: gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


# --- the mount namespace ------------------------------------------------------------------------------------------
def _target(root: str, path: str) -> str:
    return root + os.path.normpath(path)


def _make_mountpoint(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))


def _bind(source: str, target: str, read_only: bool) -> None:
    try:
        _make_mountpoint(source, target)
    except OSError as exc:
        raise JailError(f"jail: cannot make mount point for {source}: {exc.strerror or exc}") from None
    _mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    _mount(None, target, None, flags)


def _build_root(plan: JailPlan) -> None:
    root = plan.root
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host, nor theirs in
    # Mount points and device nodes only (not nodev: /dev/kvm is one); made read-only once pivoted into.
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=4096,mode=0755")
    for path in plan.read_only:
        if os.path.exists(path):
            _bind(path, _target(root, path), True)
    for path in plan.read_write:
        if os.path.exists(path):
            _bind(path, _target(root, path), False)
    for source, inside in plan.binds:
        _bind(source, _target(root, inside), False)
    for path in import_paths():
        if path not in plan.read_only:
            _bind(path, _target(root, path), True)
    if os.getpid() == 1:  # its own pid namespace: a /proc showing this VMM alone (a snapshot reads its pagemap)
        os.makedirs(root + "/proc", exist_ok=True)
        try:
            _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "subset=pid")
        except JailError:  # a kernel before 5.8: no subset=, the pid namespace still hides other processes
            _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for device in (*plan.devices, *SHARED_DEVICES):
        try:
            st = os.stat(device)
        except OSError:
            continue  # no such device on this host: the VMM says so when it opens it
        target = _target(root, device)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            mode = 0o666 if device in SHARED_DEVICES else 0o600
            os.mknod(target, stat.S_IFCHR | mode, st.st_rdev)
            os.chmod(target, mode)  # past the umask
            if device not in SHARED_DEVICES:
                os.chown(target, plan.uid, plan.gid)
        except OSError as exc:
            raise JailError(f"jail: cannot make {device} in the jail: {exc.strerror or exc}") from None
    os.chdir(root)
    libc = _c()
    _check(libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), b".", b"."), "pivot_root")
    _check(libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "detach the host's root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def import_paths() -> list[str]:
    """What this Python may still import from after pivot_root, read-only: its sys.path directories (the project's
    own packages only, not the project directory: a data dir may sit there) and the stdlib's."""
    import sys
    paths = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        if os.path.isdir(os.path.join(entry, "hypervisor")) and os.path.isfile(os.path.join(entry, "hypervisor",
                                                                                               "jail.py")):
            paths += [os.path.join(entry, "hypervisor"), os.path.join(entry, "guestboot")]
        else:
            paths.append(entry)
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in paths) if os.path.isdir(p)]


def _chown_owned(plan: JailPlan) -> None:
    for path in plan.owned:
        try:
            os.chown(path, plan.uid, plan.gid)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise JailError(f"jail: cannot hand {path} to uid {plan.uid}: {exc.strerror or exc}") from None


def enter(plan: JailPlan) -> None:
    """Jail this process (see the module docstring); call it single-threaded, as root, before the guest runs."""
    if plan.cgroup:
        _join_cgroup(plan)
    _chown_owned(plan)
    if threads() > 1:  # unshare() would move this thread alone: the others would keep the host's view
        raise JailError(f"jail: the VMM already runs {threads()} threads; the jail must come before any thread")
    flags = CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWNS if plan.mount else 0) | (CLONE_NEWNET if plan.net else 0)
    unshare(flags, "unshare namespaces")
    if plan.mount:
        os.makedirs(plan.root, exist_ok=True)
        _build_root(plan)
    try:
        os.setgroups([])
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)  # leaving uid 0 clears the capability sets
    except OSError as exc:
        raise JailError(f"jail: cannot become uid {plan.uid}: {exc.strerror or exc}") from None
    _check(_c().prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), "no_new_privs")


def threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


# --- what this host lets a service do -----------------------------------------------------------------------------
def available_features(cgroup_parent: str | None = None) -> dict[str, str | None]:
    """{feature: None when usable, else why not} for uid, mountns, pidns, netns, cgroup (seccomp: the filter's own)."""
    root = os.geteuid() == 0
    caps = _effective_caps()
    need_admin = None if (root or caps >> 21 & 1) else "needs CAP_SYS_ADMIN (run pclited as root)"
    reasons: dict[str, str | None] = {
        "uid": None if (root or (caps >> 6 & 1 and caps >> 7 & 1)) else "needs root or CAP_SETUID+CAP_SETGID",
        "mountns": need_admin, "pidns": need_admin, "netns": need_admin,
    }
    reasons["cgroup"] = need_admin or (cgroup_parent_ready(cgroup_parent) if cgroup_parent else "no cgroup parent")
    from hypervisor.seccomp_filter import unavailable_reason
    reasons["seccomp"] = unavailable_reason()
    return reasons


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0
