"""virtio-console (device id 3), one port, no MULTIPORT: the guest sees /dev/hvc0, the pclite agent channel.

Guest -> host bytes (tx queue) go to `on_output`. Host -> guest bytes enter through `push_input`; what the
guest has no rx buffers for yet waits in a bounded pending buffer and goes out when it posts more (its rx
kick). The bound is the backpressure: push_input reports how much it took and the caller keeps the rest.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from hypervisor.lazylog import LazyLogger
from hypervisor.virtio.device import VirtioDevice
from hypervisor.virtio.queue import VirtqueueError

log = LazyLogger("pclite.virtio")

RX_QUEUE = 0
TX_QUEUE = 1
DEFAULT_PENDING_CAP = 4 << 20
MAX_TX_CHAIN = 1 << 20  # Linux's hvc writes are at most a page; anything near this is hostile
FLUSH_AT = 64 << 10     # hand output to the backend in bounded pieces


class ConsoleDevice(VirtioDevice):
    device_id = 3
    num_queues = 2

    def __init__(self, on_output: Callable[[bytes], None] | None = None, pending_cap: int = DEFAULT_PENDING_CAP):
        super().__init__()
        self.on_output = on_output
        self.pending_cap = pending_cap
        self._pending = bytearray()
        # Only guards _pending; lock order is transport lock -> this one, and push_input never holds it
        # while taking the transport lock.
        self._pending_lock = threading.Lock()

    @property
    def pending(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", 0, 0, 0, 0)  # cols, rows, max_nr_ports, emerg_wr: unused without features

    def push_input(self, data: bytes | bytearray | memoryview) -> int:
        """Queue host -> guest bytes; returns how many were accepted (0 when the pending buffer is full)."""
        with self._pending_lock:
            accepted = max(0, min(len(data), self.pending_cap - len(self._pending)))
            self._pending += data[:accepted]
        if accepted and self.transport is not None:
            self.transport.run(self._deliver)
        return accepted

    def process_queue(self, index: int) -> None:
        if index == RX_QUEUE:
            self._deliver()
        elif index == TX_QUEUE:
            self._drain_tx()

    def _deliver(self) -> None:
        queue = self.queues[RX_QUEUE]
        while self.pending:
            chain = queue.pop()
            if chain is None:
                return
            with self._pending_lock:
                written = chain.write_all(bytes(self._pending[:chain.writable_len]))
                del self._pending[:written]
            queue.push_used(chain.head, written)

    def _drain_tx(self) -> None:
        queue, out, size = self.queues[TX_QUEUE], [], 0
        try:
            while (chain := queue.pop()) is not None:
                # Descriptors may alias the same guest pages, so a chain's byte count is not bounded by RAM.
                if chain.readable_len > MAX_TX_CHAIN:
                    raise VirtqueueError(f"console tx chain of {chain.readable_len} bytes (max {MAX_TX_CHAIN})")
                out.append(chain.read_all())
                size += len(out[-1])
                queue.push_used(chain.head, 0)
                if size >= FLUSH_AT:
                    self._emit(out)
                    out, size = [], 0
        finally:
            self._emit(out)  # what the guest sent before a malformed chain is still delivered

    def _emit(self, out: list[bytes]) -> None:
        if out and self.on_output is not None:
            try:
                self.on_output(b"".join(out))
            except Exception:  # a backend bug must not take down the vCPU thread
                log.exception("virtio console: on_output callback failed")

    def save_state(self) -> dict:
        state = super().save_state()
        with self._pending_lock:
            state["pending_hex"] = bytes(self._pending).hex()  # host -> guest bytes the guest has not taken yet
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        with self._pending_lock:
            self._pending = bytearray.fromhex(state["pending_hex"])

    def reset(self) -> None:
        # Pending input survives a reset on purpose: Linux resets the device when its driver probes, and the
        # host may have pushed bytes before that; they belong to the channel, not to one driver instance.
        super().reset()
