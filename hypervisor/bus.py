"""Port-IO and MMIO buses: map address ranges to devices; the vCPU loop only dispatches.

A device implements `read(offset, size) -> int` and `write(offset, size, value)`; `offset` is relative to the
range's base. Accesses nobody claims are counted, never fatal (reads see all ones, like an empty ISA bus).
"""

from __future__ import annotations

import bisect
from collections import Counter


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, object]] = []  # sorted (start, end, device)
        self.unhandled: Counter[int] = Counter()

    def register(self, base: int, length: int, device) -> None:
        end = base + length
        index = bisect.bisect_left(self._starts, base)
        before = self._ranges[index - 1] if index else None
        after = self._ranges[index] if index < len(self._ranges) else None
        if (before and before[1] > base) or (after and after[0] < end):
            raise ValueError(f"{self.name} range {base:#x}+{length:#x} overlaps another device")
        self._starts.insert(index, base)
        self._ranges.insert(index, (base, end, device))

    def find(self, addr: int):
        """(device, offset) or (None, 0)."""
        index = bisect.bisect_right(self._starts, addr) - 1
        if index >= 0:
            start, end, device = self._ranges[index]
            if addr < end:
                return device, addr - start
        return None, 0

    def read(self, addr: int, size: int) -> int:
        device, offset = self.find(addr)
        if device is None:
            self.unhandled[addr] += 1
            return (1 << (8 * size)) - 1
        return device.read(offset, size)

    def write(self, addr: int, size: int, value: int) -> None:
        device, offset = self.find(addr)
        if device is None:
            self.unhandled[addr] += 1
            return
        device.write(offset, size, value)

    def devices(self) -> list[tuple[int, int, object]]:
        return list(self._ranges)
