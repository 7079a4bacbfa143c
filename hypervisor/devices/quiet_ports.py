"""Ports Linux probes on a PC that a microVM does not have: answered quietly instead of counted as unknown.

0x80 is the POST/io-delay port; 0x70/0x71 the CMOS/RTC (kvmclock gives the wall clock, so reads return 0 and
never show "update in progress"); 0x87 DMA page; 0x92 fast A20; 0xED alternate io-delay.
"""

QUIET_PORTS = [(0x70, 2), (0x80, 1), (0x87, 1), (0x92, 1), (0xED, 1)]


class QuietPorts:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass
