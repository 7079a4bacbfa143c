"""8250/16550A UART (COM1, IRQ 4): enough for Linux's 8250 driver, console output to a sink.

Every byte the guest prints costs one VM exit, so boots that want speed use `quiet`.
"""

from __future__ import annotations

import threading
from collections import deque

COM1_BASE = 0x3F8
COM1_IRQ = 4

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDA, IER_THRE = 0x01, 0x02
IIR_NONE, IIR_THRE, IIR_RDA, IIR_FIFO_ENABLED = 0x01, 0x02, 0x04, 0xC0
LCR_DLAB = 0x80
LSR_DATA_READY, LSR_THR_EMPTY, LSR_IDLE = 0x01, 0x20, 0x40
MCR_LOOP = 0x10
MSR_DCD_DSR_CTS = 0xB0


class Serial:
    def __init__(self, sink, irq=lambda: None, tail_bytes: int = 64 * 1024):
        self._sink = sink  # callable(bytes)
        self._irq = irq  # raises IRQ 4 (an edge via irqfd)
        self._lock = threading.Lock()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.dll, self.dlm = 0x0C, 0
        self.fcr = 0
        self.thre_pending = False
        self.rx: deque[int] = deque()
        self.tail = bytearray()  # recent output, for GET /console
        self._tail_max = tail_bytes
        self.bytes_out = 0

    def _interrupt_id(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & 1 else 0
        if self.ier & IER_RDA and self.rx:
            return IIR_RDA | fifo
        if self.ier & IER_THRE and self.thre_pending:
            return IIR_THRE | fifo
        return IIR_NONE | fifo

    def _update_irq(self) -> None:
        if self._interrupt_id() & IIR_NONE == 0:
            self._irq()

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == RBR_THR:
                if self.lcr & LCR_DLAB:
                    return self.dll
                value = self.rx.popleft() if self.rx else 0
                self._update_irq()
                return value
            if offset == IER:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if offset == IIR_FCR:
                iid = self._interrupt_id()
                if iid & 0x0F == IIR_THRE:
                    self.thre_pending = False  # reading IIR acknowledges THRE
                return iid
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == LSR:
                return LSR_THR_EMPTY | LSR_IDLE | (LSR_DATA_READY if self.rx else 0)
            if offset == MSR:
                return MSR_DCD_DSR_CTS
            return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == RBR_THR:
                if self.lcr & LCR_DLAB:
                    self.dll = value
                    return
                if self.mcr & MCR_LOOP:
                    self.rx.append(value)
                else:
                    self._emit(value)
                self.thre_pending = True  # the byte left at once: THR is empty again
                self._update_irq()
            elif offset == IER:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                    return
                enabling_thre = value & IER_THRE and not self.ier & IER_THRE
                self.ier = value & 0x0F
                if enabling_thre:
                    self.thre_pending = True
                self._update_irq()
            elif offset == IIR_FCR:
                self.fcr = value
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value
            elif offset == SCR:
                self.scr = value

    def _emit(self, byte: int) -> None:
        data = bytes((byte,))
        self.bytes_out += 1
        self.tail += data
        if len(self.tail) > self._tail_max:
            del self.tail[: len(self.tail) - self._tail_max]
        self._sink(data)

    def push_input(self, data: bytes) -> None:
        with self._lock:
            self.rx.extend(data)
            self._update_irq()

    # ---- snapshot (hypervisor/snapshot.py): the registers and unread input; the output tail is not VM state

    _STATE = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "fcr", "thre_pending")

    def save_state(self) -> dict:
        with self._lock:
            state = {name: getattr(self, name) for name in self._STATE}
            state["rx_hex"] = bytes(self.rx).hex()
            return state

    def load_state(self, state: dict) -> None:
        with self._lock:
            for name in self._STATE:
                setattr(self, name, state[name])
            self.rx = deque(bytes.fromhex(state["rx_hex"]))
