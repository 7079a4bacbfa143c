"""Boot timer (Firecracker-compatible): the guest /init writes 123 at MMIO 0xC0000000 when it starts."""

from guestboot.layout import BOOT_TIMER_VALUE


class BootTimer:
    def __init__(self, on_init_reached):
        self._on_init_reached = on_init_reached
        self.fired = False

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == BOOT_TIMER_VALUE and not self.fired:
            self.fired = True
            self._on_init_reached()
