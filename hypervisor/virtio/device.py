"""The device side a transport drives: identity, features, config space and queue processing."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~0.1 s of VMM start-up in the lab)
if TYPE_CHECKING:  # the transport (virtio/mmio.py) imports this module: devices sit below it, untyped
    from hypervisor.virtio.queue import Virtqueue

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29


class VirtioDevice:
    """Subclasses set the class attributes and override process_queue (and config/reset when they need to).

    Queue processing always runs under the transport's lock, which also turns VirtqueueError and
    GuestMemoryError into DEVICE_NEEDS_RESET; host-side entry points must go through `transport.run`.
    """

    device_id = 0
    num_queues = 1
    queue_max_size = 256

    def __init__(self) -> None:
        self.transport = None  # the MmioTransport that attached this device
        self.acked_features = 0

    @property
    def features(self) -> int:
        """Device-specific feature bits; the transport adds VERSION_1 and the ring features."""
        return 0

    def attach(self, transport) -> None:
        if self.transport is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached to a transport")
        self.transport = transport

    @property
    def queues(self) -> list[Virtqueue]:
        assert self.transport is not None, "device used before MmioTransport(device, ...) attached it"
        return self.transport.queues

    def config_bytes(self) -> bytes:
        return b""

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Config space is read-only for every device here; writes are dropped."""

    def ack_features(self, features: int) -> None:
        self.acked_features = features

    def activate(self) -> None:
        """The driver set DRIVER_OK; queues may have buffers already."""
        for index, queue in enumerate(self.queues):
            if queue.ready:
                self.process_queue(index)

    def process_queue(self, index: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.acked_features = 0

    def save_state(self) -> dict:
        """Device-model state for a snapshot (the transport saves queues and status); subclasses extend it."""
        return {"acked_features": self.acked_features}

    def load_state(self, state: dict) -> None:
        self.acked_features = state["acked_features"]
