"""i8042 keyboard controller, reset line only: the guest's `reboot` (0xFE on port 0x64) stops the VM cleanly."""

I8042_DATA = 0x60
I8042_COMMAND = 0x64
CMD_RESET_CPU = 0xFE


class I8042:
    """Registered over 0x60..0x64; offsets 0 (data) and 4 (status/command)."""

    def __init__(self, on_reset):
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0  # status: output buffer empty, input buffer empty (so Linux's kb_wait returns at once)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == I8042_COMMAND - I8042_DATA and value & 0xFF == CMD_RESET_CPU:
            self._on_reset()
