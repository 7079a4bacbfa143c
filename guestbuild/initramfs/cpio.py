"""Deterministic cpio "newc" archives: sorted entries, fixed inode numbers, mtimes and owners.

The same inputs always give the same bytes, so the initramfs cache key and the archive agree.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    path: str  # relative, no leading "/"
    mode: int  # full st_mode, type bits included
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: CpioEntry, name: bytes, nlink: int) -> bytes:
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name) + 1, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


class CpioArchive:
    """Collects entries; parents are added as 0755 directories automatically."""

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    def _add(self, entry: CpioEntry) -> None:
        path = entry.path.strip("/")
        if not path or any(part in ("", ".", "..") for part in path.split("/")):
            raise ValueError(f"bad path in initramfs: {entry.path!r}")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = CpioEntry(parent, stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(existing.mode):
                raise ValueError(f"{parent} is a file in the initramfs, cannot hold {path}")
        self._entries[path] = CpioEntry(path, entry.mode, entry.data, entry.rdev)

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._add(CpioEntry(path, stat.S_IFDIR | perm))

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._add(CpioEntry(path, stat.S_IFREG | perm, data))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(CpioEntry(path, stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(CpioEntry(path, stat.S_IFCHR | perm, rdev=(major, minor)))

    def paths(self) -> list[str]:
        return sorted(self._entries)

    def to_bytes(self, compress: bool = False) -> bytes:
        chunks = []
        for ino, path in enumerate(sorted(self._entries), start=1):
            entry = self._entries[path]
            name = path.encode()
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            head = _header(ino, entry, name, nlink) + name + b"\0"
            chunks += [head, _pad4(len(head)), entry.data, _pad4(len(entry.data))]
        trailer_name = TRAILER.encode()
        head = _header(0, CpioEntry(TRAILER, 0), trailer_name, 1) + trailer_name + b"\0"
        chunks += [head, _pad4(len(head))]
        raw = b"".join(chunks)
        # mtime=0 in the gzip header keeps compressed output reproducible too
        return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw
