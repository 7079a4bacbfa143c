"""virtio-blk (device id 2) over a host file, read-only or writable, hot-swappable.

Data moves with preadv/pwritev straight between the file and guest-RAM views (no bounce buffer). A request
the file can't satisfy (out of range, read-only, host I/O error) completes with IOERR; a request that isn't a
request at all (no header or no status byte) is a broken driver and marks the device as needing reset.
"""

from __future__ import annotations

import os
import struct

from hypervisor.lazylog import LazyLogger
from hypervisor.virtio.device import VirtioDevice
from hypervisor.virtio.queue import DescriptorChain, VirtqueueError

log = LazyLogger("pclite.virtio")

VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
ID_BYTES = 20
_HEADER = struct.Struct("<IIQ")  # type, reserved, sector


def _open_backing(path: str | os.PathLike, read_only: bool) -> tuple[int, int]:
    """(fd, capacity in sectors). A trailing partial sector is not exposed."""
    fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd).st_size // SECTOR_SIZE
    except OSError:
        os.close(fd)
        raise


class BlockDevice(VirtioDevice):
    device_id = 2
    num_queues = 1
    queue_max_size = 256

    def __init__(self, path: str | os.PathLike, read_only: bool = False, serial: bytes | str = b"pclite"):
        super().__init__()
        self.path = os.fspath(path)
        self.read_only = read_only
        self.serial = (serial.encode() if isinstance(serial, str) else serial)[:ID_BYTES]
        self._fd, self.capacity = _open_backing(path, read_only)

    @property
    def features(self) -> int:
        return VIRTIO_BLK_F_FLUSH | (VIRTIO_BLK_F_RO if self.read_only else 0)

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.capacity)

    def swap_backing(self, path: str | os.PathLike, read_only: bool = False) -> None:
        """Point the disk at another file (opened first, so a bad path changes nothing) and tell the guest.

        RO is a negotiated feature, so a guest sees a change of read_only only after it re-probes; until then
        writes to a now read-only file fail with IOERR.
        """
        fd, capacity = _open_backing(path, read_only)
        # Under the transport lock no request is half-way through the old file descriptor. (No contextlib
        # nullcontext for the unattached case: this module is on the VMM's start-up path.)
        if self.transport is not None:
            with self.transport.lock:
                old = self._replace_backing(fd, path, read_only, capacity)
        else:
            old = self._replace_backing(fd, path, read_only, capacity)
        if old >= 0:
            os.close(old)
        if self.transport is not None:
            self.transport.config_changed()

    def _replace_backing(self, fd: int, path, read_only: bool, capacity: int) -> int:
        old, self._fd = self._fd, fd
        self.path, self.read_only, self.capacity = os.fspath(path), read_only, capacity
        return old

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def process_queue(self, index: int) -> None:
        queue = self.queues[index]
        while (chain := queue.pop()) is not None:
            queue.push_used(chain.head, self._handle(chain))

    def _handle(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written to the guest (data + the status byte)."""
        if chain.readable_len < _HEADER.size or chain.writable_len < 1:
            raise VirtqueueError(f"block request without header or status byte (head {chain.head})")
        rtype, _, sector = _HEADER.unpack(chain.read_all(_HEADER.size))
        status_at = chain.writable_len - 1
        try:
            status, written = self._execute(chain, rtype, sector, status_at)
        except OSError as exc:
            log.warning("virtio blk %s: %s", self.path, exc)
            status, written = VIRTIO_BLK_S_IOERR, 0
        chain.write_all(bytes([status]), skip=status_at)
        return written + 1

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector + length // SECTOR_SIZE <= self.capacity

    def _execute(self, chain: DescriptorChain, rtype: int, sector: int, data_len: int) -> tuple[int, int]:
        if rtype == VIRTIO_BLK_T_IN:
            if not self._in_range(sector, data_len):
                return VIRTIO_BLK_S_IOERR, 0
            done = os.preadv(self._fd, chain.views(True, 0, data_len), sector * SECTOR_SIZE) if data_len else 0
            return (VIRTIO_BLK_S_OK if done == data_len else VIRTIO_BLK_S_IOERR), done
        if rtype == VIRTIO_BLK_T_OUT:
            length = chain.readable_len - _HEADER.size
            if self.read_only or not self._in_range(sector, length):
                return VIRTIO_BLK_S_IOERR, 0
            done = os.pwritev(self._fd, chain.views(False, _HEADER.size), sector * SECTOR_SIZE) if length else 0
            return (VIRTIO_BLK_S_OK if done == length else VIRTIO_BLK_S_IOERR), 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            os.fsync(self._fd)
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            return VIRTIO_BLK_S_OK, chain.write_all(self.serial.ljust(ID_BYTES, b"\0")[:data_len])
        return VIRTIO_BLK_S_UNSUPP, 0
