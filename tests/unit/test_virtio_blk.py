"""virtio-blk against a real temp file: read, write, flush, get-id, range and read-only errors, hot swap."""

from __future__ import annotations

import struct

import pytest

from hypervisor.virtio import mmio as m
from hypervisor.virtio.blk import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlockDevice,
)
from tests.unit.test_virtio_driver import VirtioDriver

SECTORS = 64


def pattern(sectors: int, seed: int = 0) -> bytes:
    return b"".join(bytes([(seed + i) & 0xFF]) * 512 for i in range(sectors))


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(SECTORS))
    return path


def start(path, **kwargs) -> VirtioDriver:
    return VirtioDriver(BlockDevice(path, **kwargs)).start()


def request(d: VirtioDriver, rtype: int, sector: int = 0, out: bytes = b"", in_parts=(), *, joined=False):
    """Post header (+ out data) + writable in_parts + status; returns (status, used len, bytes read)."""
    header = struct.pack("<IIQ", rtype, 0, sector)
    readable = [header + out] if joined else [header] + ([out] if out else [])
    bufs = [(d.buf(b), len(b), False) for b in readable]
    ins = [(d.buf(n), n, True) for n in in_parts]
    status = d.buf(b"\xff")
    head = d.queues[0].add(bufs + ins + [(status, 1, True)])
    d.notify(0)
    [(used_head, used_len)] = d.queues[0].collect()
    assert used_head == head
    return d.memory.read(status, 1)[0], used_len, b"".join(d.memory.read(gpa, n) for gpa, n, _ in ins)


def test_identity_features_and_capacity(disk):
    d = start(disk)
    assert d.r(m.DEVICE_ID) == 2
    features = d.device_features()
    assert features & VIRTIO_BLK_F_FLUSH and not features & VIRTIO_BLK_F_RO
    assert d.r(m.CONFIG) == SECTORS and d.r(m.CONFIG + 4) == 0
    assert d.transport.read(m.CONFIG, 8) == SECTORS
    assert VirtioDriver(BlockDevice(disk, read_only=True)).device_features() & VIRTIO_BLK_F_RO


def test_read_across_split_buffers(disk):
    d = start(disk)
    status, used, data = request(d, VIRTIO_BLK_T_IN, 3, in_parts=(700, 324))
    assert (status, used) == (VIRTIO_BLK_S_OK, 1025)
    assert data == pattern(5)[3 * 512:]


def test_write_then_read_back(disk):
    d = start(disk)
    payload = b"W" * 512 + b"X" * 512
    assert request(d, VIRTIO_BLK_T_OUT, 10, payload, joined=True)[:2] == (VIRTIO_BLK_S_OK, 1)
    assert request(d, VIRTIO_BLK_T_OUT, 12, b"Y" * 512)[:2] == (VIRTIO_BLK_S_OK, 1)
    content = disk.read_bytes()
    assert content[10 * 512:13 * 512] == payload + b"Y" * 512
    assert content[:10 * 512] == pattern(10) and len(content) == SECTORS * 512
    assert request(d, VIRTIO_BLK_T_IN, 11, in_parts=(512,))[2] == b"X" * 512


def test_flush_and_get_id(disk):
    d = VirtioDriver(BlockDevice(disk, serial="disk-0")).start()
    assert request(d, VIRTIO_BLK_T_FLUSH)[:2] == (VIRTIO_BLK_S_OK, 1)
    status, used, data = request(d, VIRTIO_BLK_T_GET_ID, in_parts=(20,))
    assert (status, used, data) == (VIRTIO_BLK_S_OK, 21, b"disk-0".ljust(20, b"\0"))


def test_unknown_request_type(disk):
    assert request(start(disk), 99, in_parts=(16,))[0] == VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize("rtype, sector, out, in_parts", [
    (VIRTIO_BLK_T_IN, SECTORS - 1, b"", (1024,)),      # runs off the end
    (VIRTIO_BLK_T_IN, SECTORS, b"", (512,)),
    (VIRTIO_BLK_T_IN, 1 << 63, b"", (512,)),
    (VIRTIO_BLK_T_IN, 0, b"", (100,)),                  # not whole sectors
    (VIRTIO_BLK_T_OUT, SECTORS, b"z" * 512, ()),
    (VIRTIO_BLK_T_OUT, (1 << 64) - 1, b"z" * 512, ()),
    (VIRTIO_BLK_T_OUT, 0, b"z" * 100, ()),
])
def test_out_of_range_is_ioerr(disk, rtype, sector, out, in_parts):
    d = start(disk)
    status, used, _ = request(d, rtype, sector, out, in_parts)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert not d.needs_reset() and disk.read_bytes() == pattern(SECTORS)
    assert request(d, VIRTIO_BLK_T_IN, 0, in_parts=(512,))[0] == VIRTIO_BLK_S_OK  # still serving


def test_read_only_disk_refuses_writes(disk):
    d = start(disk, read_only=True)
    assert request(d, VIRTIO_BLK_T_OUT, 0, b"z" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert disk.read_bytes() == pattern(SECTORS)
    assert request(d, VIRTIO_BLK_T_IN, 1, in_parts=(512,))[2] == pattern(2)[512:]
    assert request(d, VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK


def test_swap_backing_changes_capacity_and_notifies(disk, tmp_path):
    d = start(disk)
    other = tmp_path / "other.img"
    other.write_bytes(pattern(8, seed=100) + b"tail")  # the partial sector is not exposed
    irqs = d.irqs
    d.device.swap_backing(other, read_only=True)
    assert d.r(m.CONFIG) == 8 and d.r(m.CONFIG_GENERATION) == 1
    assert d.r(m.INTERRUPT_STATUS) & m.INT_CONFIG_CHANGE and d.irqs == irqs + 1
    assert request(d, VIRTIO_BLK_T_IN, 7, in_parts=(512,))[2] == pattern(8, seed=100)[7 * 512:]
    assert request(d, VIRTIO_BLK_T_OUT, 0, b"z" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert request(d, VIRTIO_BLK_T_IN, 8, in_parts=(512,))[0] == VIRTIO_BLK_S_IOERR
    d.w(m.STATUS, 0)  # after a re-probe the guest is told the disk is read-only
    assert d.device_features() & VIRTIO_BLK_F_RO


def test_swap_to_missing_file_changes_nothing(disk, tmp_path):
    d = start(disk)
    with pytest.raises(FileNotFoundError):
        d.device.swap_backing(tmp_path / "missing.img")
    assert d.r(m.CONFIG) == SECTORS and d.r(m.CONFIG_GENERATION) == 0
    assert request(d, VIRTIO_BLK_T_IN, 0, in_parts=(512,))[0] == VIRTIO_BLK_S_OK
