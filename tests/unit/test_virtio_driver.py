"""A guest-side virtio driver for host tests (rings in a GuestMemory, handshake through the MMIO registers),
and the transport tests: register map, feature negotiation, status, reset, interrupts."""

from __future__ import annotations

import logging
import struct

import pytest

from hypervisor.memory import GuestMemory
from hypervisor.virtio import mmio as m
from hypervisor.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from hypervisor.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hypervisor.virtio.rng import RngDevice

MIB = 1 << 20
HEAP_START = 0x100000


class DriverQueue:
    """The driver's half of a split virtqueue: a free descriptor list, the avail ring it owns, used tracking."""

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int, start_idx: int = 0):
        self.memory, self.size, self.desc, self.avail, self.used = memory, size, desc, avail, used
        self.free = list(range(size))
        self.avail_idx = self.used_seen = start_idx
        memory.write_u16(avail + 2, start_idx)
        memory.write_u16(used + 2, start_idx)

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None):
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, buffers: list[tuple[int, int, bool]], publish: bool = True) -> int:
        """Chain (gpa, len, is_write) buffers through free descriptors; returns the head."""
        indexes = [self.free.pop(0) for _ in buffers]
        for i, (gpa, length, is_write) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if is_write else 0)
            self.write_desc(indexes[i], gpa, length, flags, 0 if last else indexes[i + 1])
        if publish:
            self.publish(indexes[0])
        return indexes[0]

    def add_indirect(self, buffers: list[tuple[int, int, bool]], table: int) -> int:
        for i, (gpa, length, is_write) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if is_write else 0)
            self.write_desc(i, gpa, length, flags, 0 if last else i + 1, table=table)
        head = self.free.pop(0)
        self.write_desc(head, table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def collect(self) -> list[tuple[int, int]]:
        """New used elements (head, written); their descriptors go back on the free list."""
        out = []
        while self.used_seen != self.used_idx():
            head, written = struct.unpack("<II", self.memory.read(self.used + 4 + 8 * (self.used_seen % self.size), 8))
            out.append((head, written))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
            index = head
            while True:  # free the whole (direct) chain
                _, _, flags, nxt = struct.unpack("<QIHH", self.memory.read(self.desc + 16 * index, 16))
                self.free.append(index)
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                index = nxt
        return out

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)


class VirtioDriver:
    def __init__(self, device, mem_bytes: int = 16 * MIB):
        self.memory = GuestMemory(mem_bytes)
        self.device = device
        self.irqs = 0
        self.transport = m.MmioTransport(device, self.memory, self._irq)
        self.heap = HEAP_START
        self.queues: dict[int, DriverQueue] = {}

    def _irq(self) -> None:
        self.irqs += 1

    def r(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def w(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value)

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self.heap + align - 1) & ~(align - 1)
        self.heap = gpa + size
        assert self.heap <= self.memory.size, "test heap exhausted"
        return gpa

    def buf(self, data: bytes | int) -> int:
        """A buffer in guest RAM holding data (or that many zero bytes)."""
        data = bytes(data) if isinstance(data, int) else data
        gpa = self.alloc(max(len(data), 1))
        self.memory.write(gpa, data)
        return gpa

    def device_features(self) -> int:
        self.w(m.DEVICE_FEATURES_SEL, 0)
        low = self.r(m.DEVICE_FEATURES)
        self.w(m.DEVICE_FEATURES_SEL, 1)
        return low | self.r(m.DEVICE_FEATURES) << 32

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write features, FEATURES_OK; returns whether the device kept FEATURES_OK."""
        assert (self.r(m.MAGIC_VALUE), self.r(m.VERSION_REG)) == (m.MAGIC, 2)
        self.w(m.STATUS, 0)
        self.w(m.STATUS, m.ACKNOWLEDGE)
        self.w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER)
        offered = self.device_features()
        features = offered & ~VIRTIO_RING_F_EVENT_IDX if features is None else features
        for sel in (0, 1):
            self.w(m.DRIVER_FEATURES_SEL, sel)
            self.w(m.DRIVER_FEATURES, (features >> 32 * sel) & 0xFFFFFFFF)
        self.w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK)
        return bool(self.r(m.STATUS) & m.FEATURES_OK)

    def setup_queue(self, index: int, size: int = 16, start_idx: int = 0) -> DriverQueue:
        self.w(m.QUEUE_SEL, index)
        assert self.r(m.QUEUE_READY) == 0 and size <= self.r(m.QUEUE_NUM_MAX)
        desc, avail, used = self.alloc(16 * size, 4096), self.alloc(6 + 2 * size, 2), self.alloc(6 + 8 * size, 4096)
        queue = DriverQueue(self.memory, size, desc, avail, used, start_idx)
        self.w(m.QUEUE_NUM, size)
        for low, addr in ((m.QUEUE_DESC_LOW, desc), (m.QUEUE_DRIVER_LOW, avail), (m.QUEUE_DEVICE_LOW, used)):
            self.w(low, addr & 0xFFFFFFFF)
            self.w(low + 4, addr >> 32)
        self.w(m.QUEUE_READY, 1)
        self.queues[index] = queue
        return queue

    def start(self, features: int | None = None, queue_size: int = 16) -> VirtioDriver:
        """The whole handshake: negotiate, set up every queue, DRIVER_OK."""
        assert self.negotiate(features)
        for index in range(self.device.num_queues):
            self.setup_queue(index, queue_size)
        self.w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK | m.DRIVER_OK)
        return self

    def notify(self, index: int) -> None:
        self.w(m.QUEUE_NOTIFY, index)

    def status(self) -> int:
        return self.r(m.STATUS)

    def needs_reset(self) -> bool:
        return bool(self.status() & m.DEVICE_NEEDS_RESET)


@pytest.fixture
def rng_driver():
    return VirtioDriver(RngDevice())


def test_register_map(rng_driver):
    d = rng_driver
    assert d.r(m.MAGIC_VALUE) == 0x74726976
    assert d.r(m.VERSION_REG) == 2
    assert d.r(m.DEVICE_ID) == 4
    assert d.r(m.VENDOR_ID_REG).to_bytes(4, "little") == b"pcli"
    assert d.r(m.STATUS) == 0 and d.r(m.INTERRUPT_STATUS) == 0 and d.r(m.CONFIG_GENERATION) == 0
    d.w(m.QUEUE_SEL, 0)
    assert d.r(m.QUEUE_NUM_MAX) == 256 and d.r(m.QUEUE_READY) == 0
    d.w(m.QUEUE_SEL, 1)  # rng has one queue: a missing queue reads as max size 0
    assert d.r(m.QUEUE_NUM_MAX) == 0
    offered = d.device_features()
    assert offered & VIRTIO_F_VERSION_1 and offered & VIRTIO_RING_F_INDIRECT_DESC and offered & VIRTIO_RING_F_EVENT_IDX
    d.w(m.DEVICE_FEATURES_SEL, 2)
    assert d.r(m.DEVICE_FEATURES) == 0
    assert d.transport.read(m.MAGIC_VALUE, 2) == 0  # the register area is 32-bit only
    d.transport.write(m.STATUS, 1, m.ACKNOWLEDGE)
    assert d.status() == 0


def test_cmdline_arg():
    assert m.cmdline_arg(0xD0000000, 5) == "virtio_mmio.device=4K@0xd0000000:5"


def test_feature_negotiation(rng_driver):
    assert rng_driver.negotiate()
    assert rng_driver.transport.negotiated & VIRTIO_F_VERSION_1
    assert rng_driver.status() == m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK


def test_features_ok_refused_without_version_1(rng_driver, caplog):
    caplog.set_level(logging.INFO, logger="pclite.virtio")
    assert not rng_driver.negotiate(VIRTIO_RING_F_INDIRECT_DESC)
    assert rng_driver.status() == m.ACKNOWLEDGE | m.DRIVER
    assert "VERSION_1" in caplog.text


def test_features_ok_refused_for_unoffered_bits(rng_driver):
    assert not rng_driver.negotiate(VIRTIO_F_VERSION_1 | 1 << 40)


def test_driver_features_frozen_after_features_ok(rng_driver):
    rng_driver.negotiate()
    rng_driver.w(m.DRIVER_FEATURES_SEL, 0)
    rng_driver.w(m.DRIVER_FEATURES, 0xFFFFFFFF)
    assert rng_driver.transport.driver_features == VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC


def test_reset_by_writing_zero(rng_driver):
    d = rng_driver.start()
    q = d.queues[0]
    q.add([(d.buf(8), 8, True)])
    d.notify(0)
    assert d.r(m.INTERRUPT_STATUS) == m.INT_USED_BUFFER
    d.w(m.STATUS, 0)
    assert d.status() == 0 and d.r(m.INTERRUPT_STATUS) == 0
    assert d.transport.driver_features == 0
    d.w(m.QUEUE_SEL, 0)
    assert d.r(m.QUEUE_READY) == 0
    assert d.transport.queues[0].last_avail == 0 and d.transport.queues[0].desc_addr == 0
    d.start()  # and it comes back with fresh rings
    d.queues[0].add([(d.buf(8), 8, True)])
    d.notify(0)
    assert d.queues[0].collect()[0][1] == 8


def test_interrupt_status_and_ack(rng_driver):
    d = rng_driver.start()
    d.queues[0].add([(d.buf(4), 4, True)])
    d.notify(0)
    assert d.irqs == 1 and d.r(m.INTERRUPT_STATUS) == m.INT_USED_BUFFER
    d.w(m.INTERRUPT_ACK, m.INT_USED_BUFFER)
    assert d.r(m.INTERRUPT_STATUS) == 0
    d.notify(0)  # nothing new: no interrupt
    assert d.irqs == 1


def test_config_changed_bumps_generation_and_interrupts(rng_driver):
    d = rng_driver.start()
    d.transport.config_changed()
    assert d.r(m.CONFIG_GENERATION) == 1
    assert d.r(m.INTERRUPT_STATUS) == m.INT_CONFIG_CHANGE and d.irqs == 1


def test_notify_before_driver_ok_is_deferred(rng_driver):
    d = rng_driver
    assert d.negotiate()
    q = d.setup_queue(0)
    q.add([(d.buf(16), 16, True)])
    d.notify(0)
    assert q.collect() == []
    d.w(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK | m.DRIVER_OK)
    assert q.collect() == [(0, 16)]


def test_live_queue_cannot_be_reconfigured(rng_driver):
    d = rng_driver.start()
    d.w(m.QUEUE_SEL, 0)
    d.w(m.QUEUE_NUM, 2)
    d.w(m.QUEUE_DESC_LOW, 0x1234)
    assert d.transport.queues[0].size == 16 and d.transport.queues[0].desc_addr == d.queues[0].desc
    d.w(m.QUEUE_READY, 0)
    assert d.r(m.QUEUE_READY) == 0
