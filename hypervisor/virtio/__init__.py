"""virtio-mmio devices: a split virtqueue, the MMIO transport and the rng, console and block models."""

# Resolved on first use (module __getattr__): the VMM imports only the device modules it attaches, and this
# package would otherwise pull in all of them (blk and its imports) at start-up.
_EXPORTS = {
    "BlockDevice": "blk", "ConsoleDevice": "console", "DescriptorChain": "queue", "MmioTransport": "mmio",
    "RngDevice": "rng", "VirtioDevice": "device", "Virtqueue": "queue", "VirtqueueError": "queue",
    "cmdline_arg": "mmio",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(__import__(f"{__name__}.{_EXPORTS[name]}", fromlist=[name]), name)
