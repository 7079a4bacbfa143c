"""Split virtqueue: chain parsing, index wrap-around, interrupt suppression (NO_INTERRUPT, EVENT_IDX)."""

from __future__ import annotations

import pytest

from hypervisor.memory import GuestMemory, GuestMemoryError
from hypervisor.virtio import mmio as m
from hypervisor.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from hypervisor.virtio.queue import VIRTQ_AVAIL_F_NO_INTERRUPT, Buffer, Virtqueue, VirtqueueError
from hypervisor.virtio.rng import RngDevice
from tests.unit.test_virtio_driver import MIB, DriverQueue, VirtioDriver


def make_queue(size: int = 8, start: int = 0):
    memory = GuestMemory(4 * MIB)
    driver = DriverQueue(memory, size, 0x10000, 0x20000, 0x30000, start)
    queue = Virtqueue(memory, 256)
    queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr = size, 0x10000, 0x20000, 0x30000
    queue.validate()
    queue.ready = True
    queue.last_avail = queue.used_idx = start  # as if `start` requests had already gone through
    return memory, driver, queue


def test_pop_follows_chain_and_reports_direction():
    memory, driver, queue = make_queue()
    memory.write(0x40000, b"hello")
    head = driver.add([(0x40000, 5, False), (0x41000, 3, False), (0x42000, 64, True)])
    chain = queue.pop()
    assert chain.head == head
    assert chain.buffers == [Buffer(0x40000, 5, False), Buffer(0x41000, 3, False), Buffer(0x42000, 64, True)]
    assert (chain.readable_len, chain.writable_len) == (8, 64)
    assert chain.read_all().startswith(b"hello")
    assert chain.write_all(b"x" * 100) == 64
    assert queue.pop() is None


def test_scatter_with_skip_spans_buffers():
    memory, driver, queue = make_queue()
    driver.add([(0x40000, 3, True), (0x41000, 3, True)])
    chain = queue.pop()
    assert chain.write_all(b"abcd", skip=1) == 4
    assert memory.read(0x40000, 3) == b"\0ab" and memory.read(0x41000, 3) == b"cd\0"


def test_readable_after_writable_is_rejected():
    _, driver, queue = make_queue()
    driver.add([(0x40000, 4, True), (0x41000, 4, False)])
    with pytest.raises(VirtqueueError, match="readable descriptor after"):
        queue.pop()


def test_descriptor_outside_ram_is_rejected():
    _, driver, queue = make_queue()
    driver.add([(0x40000, 4, False), (4 * MIB - 2, 4, True)])
    with pytest.raises(GuestMemoryError):
        queue.pop()


@pytest.mark.parametrize("size, desc, error", [(3, 0x10000, "power of two"), (512, 0x10000, "power of two"),
                                                (8, 0x10008, "misaligned")])
def test_validate_rejects_bad_queue_setup(size, desc, error):
    _, _, queue = make_queue()
    queue.size, queue.desc_addr = size, desc
    with pytest.raises(VirtqueueError, match=error):
        queue.validate()


def test_indexes_wrap_at_2_16():
    memory, driver, queue = make_queue(size=8, start=0xFFFA)
    seen = []
    for round_ in range(3):  # 24 requests: avail and used idx cross 0xFFFF -> 0
        heads = [driver.add([(0x40000 + 0x100 * i, 16, True)]) for i in range(8)]
        while (chain := queue.pop()) is not None:
            queue.push_used(chain.head, 16 + round_)
        used = driver.collect()
        assert [h for h, _ in used] == heads and {n for _, n in used} == {16 + round_}
        seen += used
    assert len(seen) == 24
    assert queue.used_idx == driver.used_idx() == (0xFFFA + 24) & 0xFFFF == 0x12
    assert queue.last_avail == driver.avail_idx


def test_no_interrupt_flag_suppresses():
    _, driver, queue = make_queue()
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    driver.add([(0x40000, 4, True)])
    queue.push_used(queue.pop().head, 4)
    assert not queue.needs_interrupt()
    driver.set_avail_flags(0)
    driver.add([(0x40000, 4, True)])
    queue.push_used(queue.pop().head, 4)
    assert queue.needs_interrupt()
    assert not queue.needs_interrupt()  # nothing new since


def test_event_idx_suppression_across_wrap():
    _, driver, queue = make_queue(size=8, start=0xFFFE)
    queue.event_idx = True
    queue.needs_interrupt()  # baseline: nothing pending
    driver.set_used_event(0x0000)  # "interrupt me once the used entry at index 0 is written"
    results = []
    for _ in range(4):  # used idx goes 0xFFFF, 0x0000, 0x0001 (entry 0 written), 0x0002
        driver.add([(0x40000, 4, True)])
        queue.push_used(queue.pop().head, 4)
        results.append(queue.needs_interrupt())
    assert results == [False, False, True, False]
    assert driver.avail_event() == queue.last_avail  # the device asks for a kick on the next buffer


def test_event_idx_negotiated_through_transport():
    d = VirtioDriver(RngDevice()).start(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX)
    q = d.queues[0]
    assert d.transport.queues[0].event_idx
    q.set_used_event(2)
    for _ in range(4):
        q.add([(d.buf(4), 4, True)])
        d.notify(0)
    assert d.irqs == 1 and q.used_idx() == 4
    assert q.avail_event() == 4


def test_more_than_65536_requests_through_the_transport():
    """Real wrap-around from index 0, in batches of a full 256-entry ring per notify."""
    d = VirtioDriver(RngDevice()).start(queue_size=256)
    q, buf = d.queues[0], d.buf(1)
    total = 0
    while total < 66_000:
        for _ in range(256):
            q.add([(buf, 1, True)])
        d.notify(0)
        done = q.collect()
        assert len(done) == 256 and all(n == 1 for _, n in done)
        total += len(done)
    assert not d.needs_reset() and q.used_idx() == total & 0xFFFF
    assert d.r(m.INTERRUPT_STATUS) == m.INT_USED_BUFFER
