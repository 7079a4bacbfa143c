"""Hostile rings: each must latch DEVICE_NEEDS_RESET, raise a config interrupt, log one line and return normally
to the vCPU loop; the device then ignores the queue until the driver resets it, after which it works again."""

from __future__ import annotations

import logging

import pytest

from hypervisor.virtio import mmio as m
from hypervisor.virtio.blk import BlockDevice
from hypervisor.virtio.console import ConsoleDevice
from hypervisor.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hypervisor.virtio.rng import RngDevice
from tests.unit.test_virtio_driver import VirtioDriver

W = VIRTQ_DESC_F_WRITE


def outside_ram(d, q):
    q.add([(d.memory.size - 8, 64, True)])


def far_outside_ram(d, q):
    q.add([(0xFFFF_FFFF_FFFF_F000, 0x2000, True)])


def loop(d, q):
    q.write_desc(0, d.buf(8), 8, W | VIRTQ_DESC_F_NEXT, 1)
    q.write_desc(1, d.buf(8), 8, W | VIRTQ_DESC_F_NEXT, 0)
    q.publish(0)


def self_loop(d, q):
    q.write_desc(3, d.buf(8), 8, W | VIRTQ_DESC_F_NEXT, 3)
    q.publish(3)


def next_out_of_table(d, q):
    q.write_desc(0, d.buf(8), 8, W | VIRTQ_DESC_F_NEXT, q.size)
    q.publish(0)


def head_out_of_table(d, q):
    q.publish(q.size + 1)


def nested_indirect(d, q):
    table, inner = d.alloc(32), d.alloc(16)
    q.write_desc(0, d.buf(8), 8, W, table=inner)
    q.write_desc(0, d.buf(8), 8, W | VIRTQ_DESC_F_NEXT, 1, table=table)
    q.write_desc(1, inner, 16, VIRTQ_DESC_F_INDIRECT, table=table)
    q.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    q.publish(0)


def indirect_loop(d, q):
    table = d.alloc(32)
    q.write_desc(0, d.buf(8), 8, W | VIRTQ_DESC_F_NEXT, 1, table=table)
    q.write_desc(1, d.buf(8), 8, W | VIRTQ_DESC_F_NEXT, 0, table=table)
    q.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    q.publish(0)


def indirect_bad_length(d, q):
    q.write_desc(0, d.alloc(32), 24, VIRTQ_DESC_F_INDIRECT)
    q.publish(0)


def indirect_outside_ram(d, q):
    q.write_desc(0, d.memory.size - 16, 64, VIRTQ_DESC_F_INDIRECT)
    q.publish(0)


def indirect_with_next(d, q):
    table = d.alloc(16)
    q.write_desc(0, d.buf(8), 8, W, table=table)
    q.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    q.write_desc(1, d.buf(8), 8, W)
    q.publish(0)


def chain_longer_than_queue(d, q):
    q.add_indirect([(d.buf(1), 1, True)] * (q.size + 1), d.alloc(16 * (q.size + 1)))


def avail_idx_jump(d, q):
    d.memory.write_u16(q.avail + 2, q.size + 5)


SABOTAGE = [  # (how, what the log line must say)
    (outside_ram, "not in RAM"), (far_outside_ram, "not in RAM"), (loop, "longer than the queue"),
    (self_loop, "longer than the queue"), (next_out_of_table, "out of a table"), (head_out_of_table, "out of a table"),
    (nested_indirect, "indirect descriptor inside"), (indirect_loop, "longer than the queue"),
    (indirect_bad_length, "multiple of 16"), (indirect_outside_ram, "not in RAM"), (indirect_with_next, "NEXT"),
    (chain_longer_than_queue, "longer than the queue"), (avail_idx_jump, "more than the queue size"),
]


def assert_broken(d, caplog, match="", irqs_before=0):
    assert d.needs_reset()
    assert d.r(m.INTERRUPT_STATUS) & m.INT_CONFIG_CHANGE
    assert d.irqs > irqs_before
    lines = [r for r in caplog.records if r.name == "pclite.virtio" and "needs reset" in r.getMessage()]
    assert len(lines) == 1 and match in lines[0].getMessage(), caplog.text


def assert_works_after_reset(d):
    d.start()
    q = d.queues[0]
    q.add([(d.buf(32), 32, True)])
    d.notify(0)
    assert q.collect() == [(0, 32)] and not d.needs_reset()


@pytest.mark.parametrize("sabotage, match", SABOTAGE, ids=[f.__name__ for f, _ in SABOTAGE])
def test_hostile_ring_marks_needs_reset(sabotage, match, caplog):
    caplog.set_level(logging.INFO, logger="pclite.virtio")
    d = VirtioDriver(RngDevice()).start(queue_size=8)
    q = d.queues[0]
    sabotage(d, q)
    assert d.notify(0) is None  # returned normally to the "vCPU loop"
    assert_broken(d, caplog, match)
    # Latched: further kicks are ignored, even for good buffers, and nothing more is logged.
    good = d.buf(8)
    q.avail_idx = d.memory.read_u16(q.avail + 2)
    q.free = list(range(4, 8))
    q.add([(good, 8, True)])
    irqs = d.irqs
    d.notify(0)
    assert d.memory.read(good, 8) == bytes(8) and d.irqs == irqs
    assert_broken(d, caplog, match)
    d.w(m.STATUS, d.status() | m.FAILED)  # a driver may also give up; status stays consistent
    assert d.status() & m.DEVICE_NEEDS_RESET
    assert_works_after_reset(d)


@pytest.mark.parametrize("register", [m.QUEUE_DESC_LOW, m.QUEUE_DRIVER_LOW, m.QUEUE_DEVICE_LOW])
def test_queue_addresses_outside_ram(register, caplog):
    d = VirtioDriver(RngDevice())
    assert d.negotiate()
    d.w(m.QUEUE_SEL, 0)
    d.w(m.QUEUE_NUM, 8)
    for reg in (m.QUEUE_DESC_LOW, m.QUEUE_DRIVER_LOW, m.QUEUE_DEVICE_LOW):
        d.w(reg, 0x10000 if reg != register else d.memory.size - 16)
    d.w(register + 4, 0)
    assert d.w(m.QUEUE_READY, 1) is None
    assert d.r(m.QUEUE_READY) == 0
    assert_broken(d, caplog, "not in RAM")
    assert_works_after_reset(d)


def test_ring_in_the_mmio_hole(caplog):
    d = VirtioDriver(RngDevice())
    assert d.negotiate()
    d.w(m.QUEUE_SEL, 0)
    d.w(m.QUEUE_DESC_LOW, 0xD0000000)  # our own register window: never dereferenced as memory
    d.w(m.QUEUE_READY, 1)
    assert_broken(d, caplog, "not in RAM")


def test_console_survives_hostile_tx_and_host_keeps_pushing(caplog):
    out = []
    d = VirtioDriver(ConsoleDevice(out.append)).start(queue_size=8)
    loop(d, d.queues[1])
    d.notify(1)
    assert_broken(d, caplog, "longer than the queue")
    assert d.device.push_input(b"still accepted") == 14  # buffered, not delivered, no exception
    assert out == []


def test_blk_request_without_status_byte(tmp_path, caplog):
    path = tmp_path / "disk"
    path.write_bytes(bytes(4096))
    d = VirtioDriver(BlockDevice(path)).start(queue_size=8)
    d.queues[0].add([(d.buf(16), 16, False)])
    d.notify(0)
    assert_broken(d, caplog, "without header or status")


def test_console_tx_chain_aliasing_guest_pages(caplog):
    """Seven descriptors over the same 256 KiB: 1.75 MiB "sent" from 256 KiB of RAM is refused, not copied."""
    out = []
    d = VirtioDriver(ConsoleDevice(out.append)).start(queue_size=8)
    tx = d.queues[1]
    tx.add([(d.buf(b"fine"), 4, False)])
    page = d.buf(256 << 10)
    tx.add([(page, 256 << 10, False)] * 7)
    d.notify(1)
    assert_broken(d, caplog, "console tx chain")
    assert out == [b"fine"]  # what came before the hostile chain is still delivered


def test_device_model_bug_fails_the_device_not_the_vcpu(caplog):
    class Buggy(RngDevice):
        def process_queue(self, index):
            raise ZeroDivisionError("oops")

    d = VirtioDriver(Buggy()).start()
    d.queues[0].add([(d.buf(8), 8, True)])
    assert d.notify(0) is None
    assert d.needs_reset() and "oops" in caplog.text
