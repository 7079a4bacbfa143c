"""Kernel and initrd files: mapped for the loader to parse and slice, read into guest RAM with preadv().

Copying a slice of the mapping into guest RAM faults the file in page by page; in the lab the images sit on 9p,
where that took 0.2-0.4 s for our 10 MB vmlinux. preadv() straight from the file into the guest's pages reads the
same bytes in ~20 requests of 512 KB (msize), and on a local disk it is no slower than the copy.
"""

from __future__ import annotations

import mmap
import os

from hypervisor.memory import GuestMemory


def _address(buffer) -> int:
    # Imported here: BootImages loads this module before the KVM bindings (ctypes), to start reading sooner.
    from hypervisor.kvm import buffer_address
    return buffer_address(buffer)


# path -> ((size, mtime_ns), bytes): images a fork server keeps in memory, so the VMMs it forks copy them from
# shared pages instead of reading the file again (700 ms for a 17 MB vmlinux on the lab's uncached 9p share).
_PRELOADED: dict[str, tuple[tuple[int, int], bytearray]] = {}


def preload(path: str) -> bool:
    """Keep the file's bytes in memory; True when they were read now (new, or changed since)."""
    stat = os.stat(path)
    key = (stat.st_size, stat.st_mtime_ns)
    if path in _PRELOADED and _PRELOADED[path][0] == key:
        return False
    with open(path, "rb") as file:
        _PRELOADED[path] = (key, bytearray(file.read()))
    return True


class ImageFile:
    """One image file. `view` is what the loader gets: a copy-on-write mapping that is never written (writable
    only so that the address, hence the file offset, of a slice the loader returns can be taken)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        stat = os.fstat(self.fd)
        size = stat.st_size
        self._map = None
        self.view = memoryview(b"")
        cached = _PRELOADED.get(path)
        if cached and cached[0] == (size, stat.st_mtime_ns):  # the same file as when it was preloaded
            self._map = cached[1]
            self.view = memoryview(self._map)
            self._base = _address(self._map)
        elif size:
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.view = memoryview(self._map)
            self._base = _address(self._map)

    def offset_of(self, data) -> int | None:
        """Where `data` starts in the file, if it is a non-empty slice of `view`; else None."""
        if self._map is None or not isinstance(data, memoryview) or data.obj is not self._map or not data.nbytes:
            return None
        return _address(data) - self._base

    def read_into(self, dest: memoryview, offset: int) -> None:
        if isinstance(self._map, bytearray):
            if offset + len(dest) > len(self._map):
                raise OSError(f"{self.path}: {len(dest)} bytes at {offset} are past its end ({len(self._map)})")
            import ctypes  # memmove releases the GIL (a slice copy would not): the vCPU set-up runs meanwhile
            ctypes.memmove(_address(dest), self._base + offset, len(dest))
            return
        while dest:
            count = os.preadv(self.fd, [dest], offset)
            if count <= 0:
                raise OSError(f"{self.path} ended at byte {offset} while loading it: was it truncated meanwhile?")
            dest, offset = dest[count:], offset + count

    def close(self) -> None:
        """Close the fd; the mapping stays as long as the boot plan holds slices of it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def load_segments(memory: GuestMemory, segments, images: list[ImageFile]) -> None:
    """Each segment's bytes into guest RAM: read from its file when it is a slice of one, else copied."""
    for segment in segments:
        for image in images:
            offset = image.offset_of(segment.data)
            if offset is not None:
                image.read_into(memory.view(segment.gpa, len(segment.data)), offset)
                break
        else:
            memory.write(segment.gpa, segment.data)
