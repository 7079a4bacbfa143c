"""virtio-mmio version 2 ("modern") transport: the register window the vCPU loop dispatches to.

A misbehaving guest must never crash the VMM: queue/memory errors from device processing are caught here,
latch DEVICE_NEEDS_RESET (the device then ignores the guest until it writes Status=0) and raise a config
interrupt, as the spec asks (virtio 1.1, 2.1.2).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from hypervisor.lazylog import LazyLogger
from hypervisor.memory import GuestMemory, GuestMemoryError
from hypervisor.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice,
)
from hypervisor.virtio.queue import Virtqueue, VirtqueueError

log = LazyLogger("pclite.virtio")

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"pcli", "little")

# Register offsets (virtio 1.1, 4.2.2).
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100
WINDOW_SIZE = 0x1000

# Device status bits.
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

_QUEUE_ADDR_REGS = {
    QUEUE_DESC_LOW: ("desc_addr", 0), QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("avail_addr", 0), QUEUE_DRIVER_HIGH: ("avail_addr", 32),
    QUEUE_DEVICE_LOW: ("used_addr", 0), QUEUE_DEVICE_HIGH: ("used_addr", 32),
}


def cmdline_arg(base: int, irq: int) -> str:
    """The kernel parameter that makes Linux probe a virtio-mmio device without a device tree or ACPI."""
    return f"virtio_mmio.device=4K@{base:#x}:{irq}"


class MmioTransport:
    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq: Callable[[], None], name: str | None = None):
        self.device = device
        self.memory = memory
        self.irq = irq
        self.name = name or type(device).__name__
        # Re-entrant: device callbacks run under the lock and may call back in (e.g. on_output -> push_input).
        self.lock = threading.RLock()
        self.queues = [Virtqueue(memory, device.queue_max_size) for _ in range(device.num_queues)]
        self.config_generation = 0
        self.interrupt_status = 0
        self._reset_state()
        device.attach(self)

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.broken = False
        for queue in self.queues:
            queue.reset()

    @property
    def device_features(self) -> int:
        return self.device.features | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX

    @property
    def negotiated(self) -> int:
        return self.driver_features if self.status & FEATURES_OK else 0

    # -- guarded execution ------------------------------------------------------------------------------------

    def run(self, fn: Callable, *args, default=None):
        """Run device work that touches queues: locked, only while live, errors become DEVICE_NEEDS_RESET."""
        with self.lock:
            if self.broken or not self.status & DRIVER_OK:
                return default
            try:
                result = fn(*args)
                self._signal_used()
                return result
            except (VirtqueueError, GuestMemoryError) as exc:
                self._fail(exc)
                return default
            except Exception as exc:  # a device-model bug: fail this device, not the vCPU loop and the VM
                log.exception("virtio %s: device model error", self.name)
                self._fail(exc)
                return default

    def _signal_used(self) -> None:
        # needs_interrupt must see every queue (it consumes state), hence no short-circuit any().
        if sum(queue.needs_interrupt() for queue in self.queues if queue.ready):
            self._interrupt(INT_USED_BUFFER)

    def _fail(self, exc: Exception) -> None:
        if self.broken:
            return
        self.broken = True
        self.status |= DEVICE_NEEDS_RESET
        log.warning("virtio %s: %s; device needs reset", self.name, exc)
        self._interrupt(INT_CONFIG_CHANGE)

    def _interrupt(self, bit: int) -> None:
        self.interrupt_status |= bit
        self.irq()  # pulsed every time: the guest may already have read InterruptStatus

    def notify(self, index: int) -> None:
        """A QueueNotify write (also the entry point for an ioeventfd-driven notifier thread)."""
        with self.lock:
            if index < len(self.queues) and self.queues[index].ready:
                self.run(self.device.process_queue, index)

    def config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & DRIVER_OK:
                self._interrupt(INT_CONFIG_CHANGE)

    # -- snapshot (hypervisor/snapshot.py) --------------------------------------------------------------------

    _STATE = ("status", "device_features_sel", "driver_features_sel", "driver_features", "queue_sel",
              "interrupt_status", "broken", "config_generation")

    def save_state(self) -> dict:
        with self.lock:
            state = {name: getattr(self, name) for name in self._STATE}
            state["queues"] = [queue.save_state() for queue in self.queues]
            state["device"] = self.device.save_state()
            return state

    def load_state(self, state: dict) -> None:
        with self.lock:
            if len(state["queues"]) != len(self.queues):
                raise ValueError(f"virtio {self.name}: the snapshot has {len(state['queues'])} queues, this device "
                                 f"has {len(self.queues)}")
            for name in self._STATE:
                setattr(self, name, state[name])
            for queue, saved in zip(self.queues, state["queues"], strict=True):
                queue.load_state(saved)
            self.device.load_state(state["device"])

    # -- register window --------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= CONFIG:
                return self.device.read_config(offset - CONFIG, size) if offset + size <= WINDOW_SIZE else 0
            if size != 4 or offset % 4:
                return 0  # the spec requires 32-bit accesses to the register area
            return self._read_register(offset)

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (self.device_features >> 32 * self.device_features_sel) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= CONFIG:
                if offset + size <= WINDOW_SIZE:
                    self.device.write_config(offset - CONFIG, size, value)
                return
            if size != 4 or offset % 4:
                return
            self._write_register(offset, value & 0xFFFFFFFF)

    def _write_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if not self.status & FEATURES_OK and self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value)
        elif offset == QUEUE_NOTIFY:
            self.notify(value)
        elif queue is None:
            return
        elif offset == QUEUE_READY:
            if not value & 1:
                queue.ready = False
            elif not queue.ready:
                self._enable_queue(queue)
        elif queue.ready:
            return  # the driver must not reconfigure a live queue; ignoring keeps our view consistent
        elif offset == QUEUE_NUM:
            queue.size = value
        elif offset in _QUEUE_ADDR_REGS:
            attr, shift = _QUEUE_ADDR_REGS[offset]
            setattr(queue, attr, (getattr(queue, attr) & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _enable_queue(self, queue: Virtqueue) -> None:
        if self.broken:
            return
        try:
            queue.validate()
        except (VirtqueueError, GuestMemoryError) as exc:
            self._fail(exc)
            return
        queue.event_idx = bool(self.negotiated & VIRTIO_RING_F_EVENT_IDX)
        queue.ready = True

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_state()
            return
        value &= 0xFF & ~DEVICE_NEEDS_RESET  # that bit is ours to set
        added = value & ~self.status
        if added & FEATURES_OK and not self._accept_features():
            value &= ~FEATURES_OK  # the driver re-reads Status and gives up (virtio 1.1, 3.1.1)
        self.status = value | (self.status & DEVICE_NEEDS_RESET)
        if added & DRIVER_OK and self.status & DRIVER_OK:
            self.run(self.device.activate)

    def _accept_features(self) -> bool:
        if self.driver_features & ~self.device_features:
            log.info("virtio %s: driver accepted unoffered features %#x", self.name,
                     self.driver_features & ~self.device_features)
            return False
        if not self.driver_features & VIRTIO_F_VERSION_1:
            log.info("virtio %s: legacy driver (no VERSION_1) refused", self.name)
            return False
        self.device.ack_features(self.driver_features)
        return True
