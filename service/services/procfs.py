"""Finding VMM processes in /proc: by their command line, or (forked by the fork server, whose command line they
keep) by the Unix sockets they have bound. Blocking; pure reads of /proc.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else None


def listening_unix_sockets(pid: int | str = "self") -> dict[int, str]:
    """{socket inode: path} of every bound Unix socket in the network namespace of `pid` (/proc/PID/net/unix, as
    `ss -x` reads it): a jailed VMM has a network namespace of its own."""
    table: dict[int, str] = {}
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8:
                    table[int(fields[6])] = fields[7]
    except (OSError, ValueError, StopIteration):
        pass
    return table


def unix_sockets_of(pid: int, table: dict[int, str] | None = None) -> set[str]:
    """Paths of the Unix sockets process `pid` has bound: how a VMM forked by the fork server (whose cmdline is
    the server's) is matched to its API socket."""
    if table is None or _netns(pid) != _netns("self"):
        table = listening_unix_sockets(pid)
    paths = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and int(link[8:-1]) in table:
                    paths.add(table[int(link[8:-1])])
    except OSError:
        pass
    return paths


def _netns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _in_dir(path: str, prefix: str) -> bool:
    """Directly in the directory: VMs' sockets are; the fork server's and template VMs' live in subdirectories."""
    return path.startswith(prefix) and "/" not in path[len(prefix):]


def scan_vmms(run_dir: Path) -> dict[str, int]:
    """{socket path: pid} of every VMM process (fresh or forked) whose API socket is directly in run_dir."""
    prefix = str(run_dir) + "/"
    found: dict[str, int] = {}
    table = None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        args = proc_cmdline(int(entry.name))
        if not args or "hypervisor" not in args:
            continue
        if "--api-sock" in args:
            index = args.index("--api-sock")
            if index + 1 < len(args) and _in_dir(args[index + 1], prefix):
                found[args[index + 1]] = int(entry.name)
        elif "forkserver" in args:  # the server itself, or a VMM it forked: known by its bound socket
            table = listening_unix_sockets() if table is None else table
            for path in unix_sockets_of(int(entry.name), table):
                if _in_dir(path, prefix):
                    found[path] = int(entry.name)
    return found


def is_vmm(pid: int | None, socket_path: str) -> bool:
    """Alive and really that VM's VMM: the pid alone could have been reused by now."""
    if not pid:
        return False
    args = proc_cmdline(pid)  # a zombie has an empty cmdline
    if not args or "hypervisor" not in args:
        return False
    return socket_path in args or ("forkserver" in args and socket_path in unix_sockets_of(pid))
