"""OCI runtime-spec (config.json) → what the VM does: mounts for the agent, the process for POST /exec.

The VM is the container's sandbox, so namespaces, cgroups, seccomp, capabilities and AppArmor have nothing to apply
to and are ignored; host bind mounts cannot reach into a VM and are skipped (logged by the caller).
"""

import os

from service.runtime.jsonlite import loads

GUEST_ROOT = "/rootfs"  # where pclited has the agent mount the rootfs disk (service/services/rootfs.py)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# mount(8) options → MS_* flags (set, or cleared when the value is negative); the rest goes to the fs as data.
MS_FLAGS = {"ro": 1, "rw": -1, "nosuid": 2, "suid": -2, "nodev": 4, "dev": -4, "noexec": 8, "exec": -8,
            "sync": 16, "async": -16, "remount": 32, "mand": 64, "nomand": -64, "dirsync": 128, "noatime": 1024,
            "atime": -1024, "nodiratime": 2048, "diratime": -2048, "bind": 4096, "rbind": 4096 | 16384,
            "relatime": 1 << 21, "norelatime": -(1 << 21), "strictatime": 1 << 24, "nostrictatime": -(1 << 24)}
PROPAGATION = {"private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable"}
RLIMITS = {"RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4, "RLIMIT_RSS": 5,
           "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10,
           "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14,
           "RLIMIT_RTTIME": 15}
NO_FS_IN_GUEST = {"cgroup", "cgroup2"}  # the guest kernel has no cgroups


class SpecError(Exception):
    """The bundle or process spec cannot run; the message says what to fix."""


def load_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = loads(f.read())
    except FileNotFoundError:
        raise SpecError(f"{what} {path} does not exist: is the --bundle/--process path right?") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"{what} {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{what} {path} must be a JSON object")
    return data


def rootfs_path(bundle: str, config: dict) -> str:
    """The bundle's rootfs directory (root.path, relative to the bundle), which must exist and not be empty."""
    root = config.get("root") or {}
    path = root.get("path") if isinstance(root, dict) else None
    if not path or not isinstance(path, str):
        raise SpecError(f"config.json in {bundle} has no root.path: the bundle needs a rootfs directory")
    full = os.path.normpath(os.path.join(bundle, path))
    if not os.path.isdir(full):
        raise SpecError(f"the bundle {bundle} has no rootfs at {full} (root.path {path!r}): unpack the image's "
                        f"rootfs there (containerd mounts its snapshot there before calling the runtime)")
    if not os.listdir(full):
        raise SpecError(f"the bundle's rootfs {full} is empty: is the image's snapshot mounted there?")
    return full


def mount_flags(options: list[str]) -> tuple[int, str]:
    """(MS_* flags, fs data) for mount(8)-style options."""
    flags, data = 0, []
    for option in options:
        bits = MS_FLAGS.get(option)
        if bits is None:
            if option not in PROPAGATION:
                data.append(option)
        elif bits > 0:
            flags |= bits
        else:
            flags &= ~-bits
    return flags, ",".join(data)


def guest_mounts(config: dict) -> tuple[list[dict], list[str]]:
    """(the mounts for POST /mounts, in order, inside the guest's rootfs; what was skipped and why)."""
    mounts, skipped = [], []
    for mount in config.get("mounts") or []:
        destination, fstype = mount.get("destination", ""), mount.get("type") or ""
        options = list(mount.get("options") or [])
        if not destination.startswith("/"):
            skipped.append(f"{destination!r}: not an absolute destination")
            continue
        if fstype == "bind" or "bind" in options or "rbind" in options:
            skipped.append(f"{destination}: a bind mount of the host's {mount.get('source')} cannot reach into a VM")
            continue
        if fstype in NO_FS_IN_GUEST:
            skipped.append(f"{destination}: {fstype} (the guest kernel has no cgroups)")
            continue
        flags, data = mount_flags(options)
        source = mount.get("source") or fstype or "none"
        if destination == "/dev" and fstype == "tmpfs":
            # A tmpfs /dev would need every device node made by hand; the guest's devtmpfs has them (it is the
            # container's own VM, so nothing of the host shows through).
            fstype, source, data = "devtmpfs", "devtmpfs", ""
        mounts.append({"source": source, "target": GUEST_ROOT + destination.rstrip("/"), "fstype": fstype,
                       "flags": flags, "data": data, "mkdir": True})
    return mounts, skipped


def guest_process(process: dict) -> dict:
    """A spec's process object → the body of the VMM's POST /exec (without "interactive")."""
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) and a for a in args):
        raise SpecError("process.args must be a non-empty list of non-empty strings (the command to run)")
    env = {}
    for item in process.get("env") or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"process.env entry {item!r} is not KEY=VALUE")
        env[key] = value
    cwd = process.get("cwd") or "/"
    if not cwd.startswith("/"):
        raise SpecError(f"process.cwd {cwd!r} must be an absolute path")
    user = process.get("user") or {}
    body = {"argv": args, "env": env, "cwd": cwd, "root": GUEST_ROOT,
            "user": {"uid": int(user.get("uid", 0)), "gid": int(user.get("gid", 0)),
                     "groups": [int(g) for g in user.get("additionalGids") or []]}}
    rlimits = []
    for limit in process.get("rlimits") or []:
        resource = RLIMITS.get(limit.get("type"))
        if resource is None:
            raise SpecError(f"process.rlimits type {limit.get('type')!r} is not a Linux RLIMIT_* name")
        rlimits.append([resource, int(limit.get("soft", 0)), int(limit.get("hard", 0))])
    if rlimits:
        body["rlimits"] = rlimits
    if process.get("terminal"):
        body["tty"] = True
        size = process.get("consoleSize") or {}
        if size.get("height") and size.get("width"):
            body["size"] = [int(size["height"]), int(size["width"])]
    return body
