"""virtio-mmio devices: a split virtqueue, the MMIO transport and the rng, console and block models."""

from hypervisor.virtio.blk import BlockDevice
from hypervisor.virtio.console import ConsoleDevice
from hypervisor.virtio.device import VirtioDevice
from hypervisor.virtio.mmio import MmioTransport, cmdline_arg
from hypervisor.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from hypervisor.virtio.rng import RngDevice

__all__ = [
    "BlockDevice", "ConsoleDevice", "DescriptorChain", "MmioTransport", "RngDevice", "VirtioDevice", "Virtqueue",
    "VirtqueueError", "cmdline_arg",
]
