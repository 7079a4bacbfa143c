"""Device state for snapshots: what save_state() keeps lets a fresh device carry on mid-conversation."""

from __future__ import annotations

import json

from hypervisor.devices.serial import IER, LCR, LSR, RBR_THR, SCR, Serial
from hypervisor.virtio import mmio as m
from hypervisor.virtio.console import RX_QUEUE, TX_QUEUE, ConsoleDevice
from tests.unit.test_virtio_driver import VirtioDriver


def test_serial_registers_and_unread_input_survive():
    serial = Serial(lambda data: None)
    serial.write(LCR, 1, 0x03)
    serial.write(IER, 1, 0x01)
    serial.write(SCR, 1, 0x42)
    serial.push_input(b"ab")
    state = json.loads(json.dumps(serial.save_state()))  # what goes into state.json
    copy = Serial(lambda data: None)
    copy.load_state(state)
    assert (copy.read(IER, 1), copy.read(SCR, 1), copy.read(LSR, 1) & 1) == (0x01, 0x42, 1)
    assert bytes([copy.read(RBR_THR, 1), copy.read(RBR_THR, 1)]) == b"ab"


def test_console_transport_carries_on_after_restore():
    out: list[bytes] = []
    driver = VirtioDriver(ConsoleDevice(out.append)).start()
    rx, tx = driver.queues[RX_QUEUE], driver.queues[TX_QUEUE]
    tx.add([(driver.buf(b"before"), 6, False)])
    driver.notify(TX_QUEUE)
    rx_buffer = driver.buf(64)
    rx_head = rx.add([(rx_buffer, 64, True)])
    driver.notify(RX_QUEUE)  # posted, nothing to deliver yet
    driver.transport.device.push_input(b"0123")
    assert rx.collect() == [(rx_head, 4)]
    rx_buffer = driver.buf(64)
    rx_head = rx.add([(rx_buffer, 64, True)])
    driver.notify(RX_QUEUE)
    saved = json.loads(json.dumps(driver.transport.save_state()))

    # The clone: a new device and transport over (a copy of) the same RAM, loaded from the saved state.
    clone_out: list[bytes] = []
    device = ConsoleDevice(clone_out.append)
    transport = m.MmioTransport(device, driver.memory, lambda: None)
    transport.load_state(saved)
    assert transport.read(m.STATUS, 4) & m.DRIVER_OK
    device.push_input(b"after restore")  # lands in the buffer the guest posted before the snapshot
    assert rx.collect() == [(rx_head, 13)]
    assert driver.memory.read(rx_buffer, 13) == b"after restore"
    driver.transport = transport
    tx.add([(driver.buf(b"and back"), 8, False)])
    driver.notify(TX_QUEUE)
    assert out == [b"before"] and clone_out == [b"and back"]


def test_console_pending_input_is_kept():
    device = ConsoleDevice()
    VirtioDriver(device)  # attached, never started: input waits in the device
    device.push_input(b"not yet taken")
    clone = ConsoleDevice()
    VirtioDriver(clone)
    clone.transport.load_state(json.loads(json.dumps(device.transport.save_state())))
    assert clone.pending == len(b"not yet taken")
