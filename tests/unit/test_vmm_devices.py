"""Legacy device models and the buses, driven the way Linux drives them (no KVM needed)."""

import pytest

from hypervisor.bus import Bus
from hypervisor.cli_args import REQUIRED, UsageError, parse_options
from hypervisor.devices.boot_timer import BootTimer
from hypervisor.devices.i8042 import I8042
from hypervisor.devices.serial import IER, IIR_FCR, LCR, LSR, MCR, RBR_THR, Serial
from hypervisor.memory import GuestMemory, GuestMemoryError


class Recorder:
    def __init__(self):
        self.out = bytearray()
        self.irqs = 0

    def sink(self, data):
        self.out += data

    def irq(self):
        self.irqs += 1


def test_serial_polled_output_like_printk():
    rec = Recorder()
    uart = Serial(rec.sink, rec.irq)
    for byte in b"hello\n":
        assert uart.read(LSR, 1) & 0x20  # THR empty: printk polls this before each byte
        uart.write(RBR_THR, 1, byte)
    assert rec.out == b"hello\n" and uart.tail == b"hello\n" and rec.irqs == 0


def test_serial_thre_interrupt_drives_tty_output():
    rec = Recorder()
    uart = Serial(rec.sink, rec.irq)
    uart.write(IER, 1, 0x02)  # enable THRE interrupt: raised at once since THR is empty
    assert rec.irqs == 1
    assert uart.read(IIR_FCR, 1) & 0x0F == 0x02  # THRE pending ...
    assert uart.read(IIR_FCR, 1) & 0x0F == 0x01  # ... and acknowledged by that read
    uart.write(RBR_THR, 1, ord("x"))
    assert rec.irqs == 2 and rec.out == b"x"
    uart.write(IER, 1, 0)
    uart.write(RBR_THR, 1, ord("y"))
    assert rec.irqs == 2


def test_serial_divisor_latch_and_loopback():
    rec = Recorder()
    uart = Serial(rec.sink, rec.irq)
    uart.write(LCR, 1, 0x80)
    uart.write(RBR_THR, 1, 0x01)
    uart.write(IER, 1, 0x00)
    assert uart.read(RBR_THR, 1) == 0x01 and rec.out == b""  # DLAB: the divisor, not data
    uart.write(LCR, 1, 0x03)
    uart.write(MCR, 1, 0x10)  # loopback, as the 8250 driver's probe does
    uart.write(RBR_THR, 1, 0x5A)
    assert uart.read(LSR, 1) & 0x01 and uart.read(RBR_THR, 1) == 0x5A and rec.out == b""


def test_serial_input_raises_rx_interrupt():
    rec = Recorder()
    uart = Serial(rec.sink, rec.irq)
    uart.write(IER, 1, 0x01)
    uart.push_input(b"ab")
    assert rec.irqs == 1 and uart.read(IIR_FCR, 1) & 0x0F == 0x04
    assert uart.read(RBR_THR, 1) == ord("a") and uart.read(RBR_THR, 1) == ord("b")
    assert not uart.read(LSR, 1) & 0x01


def test_serial_tail_is_bounded():
    uart = Serial(lambda data: None, tail_bytes=16)
    for byte in range(100):
        uart.write(RBR_THR, 1, byte)
    assert uart.tail == bytes(range(84, 100)) and uart.bytes_out == 100


def test_i8042_reset_stops_and_status_reads_empty():
    resets = []
    kbd = I8042(lambda: resets.append(1))
    assert kbd.read(4, 1) == 0
    kbd.write(4, 1, 0x20)
    assert resets == []
    kbd.write(4, 1, 0xFE)
    assert resets == [1]


def test_boot_timer_fires_once_on_123():
    fired = []
    timer = BootTimer(lambda: fired.append(1))
    timer.write(0, 1, 7)
    timer.write(0, 1, 123)
    timer.write(0, 1, 123)
    assert fired == [1]


def test_bus_dispatch_unknown_and_overlap():
    bus = Bus("pio")
    rec = []

    class Dev:
        def read(self, offset, size):
            return offset

        def write(self, offset, size, value):
            rec.append((offset, size, value))

    bus.register(0x3F8, 8, Dev())
    assert bus.read(0x3FD, 1) == 5
    bus.write(0x3F9, 1, 0xAB)
    assert rec == [(1, 1, 0xAB)]
    assert bus.read(0x2F8, 1) == 0xFF and bus.read(0x2F8, 2) == 0xFFFF
    bus.write(0x2F8, 1, 0)
    assert bus.unhandled[0x2F8] == 3
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0x3FF, 2, Dev())


def test_guest_memory_bounds_and_hole():
    mem = GuestMemory(4 << 30)  # 4 GiB: 3 GiB below the hole, 1 GiB above 4 GiB
    assert [(gpa, size) for gpa, size, _ in mem.regions] == [(0, 3 << 30), (4 << 30, 1 << 30)]
    mem.write(0x1000, b"abc")
    assert mem.read(0x1000, 3) == b"abc"
    mem.write_u32((4 << 30) + 8, 0xDEADBEEF)
    assert mem.read_u32((4 << 30) + 8) == 0xDEADBEEF
    for gpa, length in ((0xC0000000, 1), ((3 << 30) - 2, 4), (5 << 30, 1), (-1, 1)):
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, length)
    mem.close()


def test_vmm_option_parser():
    spec = {"--kernel": (str, REQUIRED), "--mem": (int, 256), "--timeline": (bool, False)}
    assert parse_options(["--kernel", "k", "--mem=512", "--timeline"], spec, "u") == \
        {"kernel": "k", "mem": 512, "timeline": True}
    for bad, message in ((["--mem", "1"], "missing --kernel"), (["--kernel", "k", "--mem", "x"], "wants int"),
                         (["--kernel"], "needs a value"), (["--bogus"], "unknown option")):
        with pytest.raises(UsageError, match=message):
            parse_options(bad, spec, "u")
