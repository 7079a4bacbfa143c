"""virtio-rng and virtio-console driven through guest memory and the MMIO registers."""

from __future__ import annotations

import threading

from hypervisor.virtio import mmio as m
from hypervisor.virtio.console import RX_QUEUE, TX_QUEUE, ConsoleDevice
from hypervisor.virtio.rng import RngDevice
from tests.unit.test_virtio_driver import VirtioDriver


def test_rng_fills_chained_write_only_buffers():
    d = VirtioDriver(RngDevice()).start()
    header, a, b = d.buf(b"ro-bytes"), d.buf(64), d.buf(100)
    head = d.queues[0].add([(header, 8, False), (a, 64, True), (b, 100, True)])
    d.notify(0)
    assert d.queues[0].collect() == [(head, 164)]
    assert d.memory.read(header, 8) == b"ro-bytes"
    assert d.memory.read(a, 64) != bytes(64) and d.memory.read(b, 100) != bytes(100)
    assert d.r(m.INTERRUPT_STATUS) == m.INT_USED_BUFFER and d.irqs == 1


def console(**kwargs):
    out: list[bytes] = []
    d = VirtioDriver(ConsoleDevice(out.append, **kwargs))
    return d, out


def test_console_identity_and_config():
    d, _ = console()
    assert d.r(m.DEVICE_ID) == 3
    assert d.device_features() & 0xFFFFFFFF & ~(3 << 28) == 0  # no SIZE, MULTIPORT or EMERG_WRITE
    assert d.transport.read(m.CONFIG + 4, 4) == 0  # max_nr_ports: unused without MULTIPORT


def test_tx_chained_descriptors():
    d, out = console()
    d.start()
    tx = d.queues[TX_QUEUE]
    head = tx.add([(d.buf(b"hel"), 3, False), (d.buf(b"lo, "), 4, False), (d.buf(b"world"), 5, False)])
    d.notify(TX_QUEUE)
    assert out == [b"hello, world"]
    assert tx.collect() == [(head, 0)]
    assert d.irqs == 1


def test_tx_several_chains_in_one_kick_arrive_in_order():
    d, out = console()
    d.start()
    tx = d.queues[TX_QUEUE]
    for word in (b"one ", b"two ", b"three"):
        tx.add([(d.buf(word), len(word), False)])
    d.notify(TX_QUEUE)
    assert b"".join(out) == b"one two three"


def test_tx_indirect_descriptors():
    d, out = console()
    d.start()
    parts = [b"in", b"di", b"rect"]
    table = d.alloc(16 * len(parts))
    d.queues[TX_QUEUE].add_indirect([(d.buf(p), len(p), False) for p in parts], table)
    d.notify(TX_QUEUE)
    assert out == [b"indirect"] and not d.needs_reset()


def test_rx_pending_bytes_are_delivered_when_buffers_arrive():
    d, _ = console()
    assert d.device.push_input(b"early bytes, before the driver") == 30  # even before DRIVER_OK
    d.start()
    rx = d.queues[RX_QUEUE]
    first = [d.buf(8), d.buf(8)]
    for gpa in first:
        rx.add([(gpa, 8, True)])
    d.notify(RX_QUEUE)
    assert [n for _, n in rx.collect()] == [8, 8]
    assert d.memory.read(first[0], 8) + d.memory.read(first[1], 8) == b"early bytes, bef"
    assert d.device.pending == 14
    irqs = d.irqs
    big = d.buf(64)
    rx.add([(big, 64, True)])
    d.notify(RX_QUEUE)
    assert rx.collect() == [(2, 14)] and d.memory.read(big, 14) == b"ore the driver"
    assert d.device.pending == 0 and d.irqs == irqs + 1
    d.notify(RX_QUEUE)  # nothing pending: the buffer stays posted
    assert rx.collect() == [] and d.irqs == irqs + 1


def test_push_input_goes_straight_into_posted_buffers():
    d, _ = console()
    d.start()
    rx = d.queues[RX_QUEUE]
    gpa = d.buf(32)
    rx.add([(gpa, 32, True)])
    d.notify(RX_QUEUE)
    assert d.device.push_input(b"ping") == 4
    assert rx.collect() == [(0, 4)] and d.memory.read(gpa, 4) == b"ping"
    assert d.r(m.INTERRUPT_STATUS) == m.INT_USED_BUFFER


def test_backpressure_cap():
    d, _ = console(pending_cap=16)
    d.start()
    assert d.device.push_input(b"x" * 20) == 16
    assert d.device.push_input(b"y") == 0
    d.queues[RX_QUEUE].add([(d.buf(10), 10, True)])
    d.notify(RX_QUEUE)
    assert d.device.pending == 6
    assert d.device.push_input(b"z" * 20) == 10
    assert d.device.pending == 16


def test_pending_input_survives_driver_reset():
    d, _ = console()
    d.device.push_input(b"hello agent")
    d.start()
    d.w(m.STATUS, 0)
    d.start()
    gpa = d.buf(16)
    d.queues[RX_QUEUE].add([(gpa, 16, True)])
    d.notify(RX_QUEUE)
    assert d.memory.read(gpa, 11) == b"hello agent"


def test_output_callback_may_reenter_and_may_fail():
    d = VirtioDriver(ConsoleDevice())
    d.device.on_output = lambda data: d.device.push_input(data.upper())  # an echoing backend
    d.start()
    rx, tx = d.queues[RX_QUEUE], d.queues[TX_QUEUE]
    gpa = d.buf(8)
    rx.add([(gpa, 8, True)])
    d.notify(RX_QUEUE)
    tx.add([(d.buf(b"echo"), 4, False)])
    d.notify(TX_QUEUE)
    assert d.memory.read(gpa, 4) == b"ECHO"

    def broken_backend(data):
        raise RuntimeError("socket closed")

    d.device.on_output = broken_backend
    tx.collect()
    tx.add([(d.buf(b"lost"), 4, False)])
    assert d.notify(TX_QUEUE) is None and not d.needs_reset()
    assert [n for _, n in tx.collect()] == [0]


def test_host_thread_pushes_while_vcpu_kicks():
    """A backend thread feeding input while the vCPU recycles rx buffers: nothing lost, nothing duplicated."""
    d, _ = console()
    d.start(queue_size=64)
    rx = d.queues[RX_QUEUE]
    buffers = {}
    for _ in range(64):
        gpa = d.buf(16)
        buffers[rx.add([(gpa, 16, True)])] = gpa
    payload = bytes(range(256)) * 40
    done = threading.Event()

    def feed():
        sent = 0
        while sent < len(payload):
            sent += d.device.push_input(payload[sent:sent + 100])
        done.set()

    thread = threading.Thread(target=feed)
    thread.start()
    received = bytearray()
    while not (done.is_set() and d.device.pending == 0 and len(received) == len(payload)):
        with d.transport.lock:  # the test's "guest" shares the rings with the device, like real memory
            used = rx.collect()
            for head, n in used:
                received += d.memory.read(buffers[head], n)
                rx.write_desc(head, buffers[head], 16, 2)
                rx.free.remove(head)
                rx.publish(head)
        if used or d.device.pending:
            d.notify(RX_QUEUE)
    thread.join()
    assert bytes(received) == payload and not d.needs_reset()


def test_large_tx_batch_reaches_the_backend_in_bounded_pieces():
    d, out = console()
    d.start(queue_size=64)
    chunk = d.buf(b"a" * 4096)
    for _ in range(40):  # 160 KiB in one kick
        d.queues[TX_QUEUE].add([(chunk, 4096, False)])
    d.notify(TX_QUEUE)
    assert sum(map(len, out)) == 40 * 4096 and max(map(len, out)) <= 64 << 10 and len(out) == 3
