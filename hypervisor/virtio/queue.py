"""Split virtqueue (virtio 1.1 section 2.6), device side.

Everything the guest wrote is untrusted: every index is range-checked and every address goes through
GuestMemory.view, so a hostile ring can only produce VirtqueueError/GuestMemoryError, never a host access
outside guest RAM or an unbounded loop.
"""

from __future__ import annotations

import struct
from collections import namedtuple

from hypervisor.memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # the spec's ceiling for split queues

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class VirtqueueError(Exception):
    """The driver put something on a ring that no well-behaved driver would: the device needs a reset."""


# is_write: device-writable (the guest reads it back). collections' namedtuple: typing's costs ~0.1 s in the lab.
Buffer = namedtuple("Buffer", "gpa length is_write")


class DescriptorChain:
    """One popped request: its head index (for push_used) and its buffers, readable ones first."""

    def __init__(self, memory: GuestMemory, head: int, buffers: list[Buffer]):
        self.memory = memory
        self.head = head
        self.buffers = buffers

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.is_write]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.is_write]

    @property
    def readable_len(self) -> int:
        return sum(b.length for b in self.buffers if not b.is_write)

    @property
    def writable_len(self) -> int:
        return sum(b.length for b in self.buffers if b.is_write)

    def views(self, write: bool, skip: int = 0, length: int | None = None) -> list[memoryview]:
        """Guest-memory views over the readable (or writable) bytes [skip, skip+length), for preadv/pwritev."""
        out, remaining = [], length
        for buf in self.writable if write else self.readable:
            if remaining is not None and remaining <= 0:
                break
            if skip >= buf.length:
                skip -= buf.length
                continue
            take = buf.length - skip
            if remaining is not None:
                take = min(take, remaining)
                remaining -= take
            out.append(self.memory.view(buf.gpa + skip, take))
            skip = 0
        return out

    def read_all(self, limit: int | None = None) -> bytes:
        return b"".join(bytes(v) for v in self.views(False, 0, limit))

    def write_all(self, data: bytes | bytearray | memoryview, skip: int = 0) -> int:
        """Scatter data over the writable buffers from byte `skip`; returns how many bytes fitted."""
        data, done = memoryview(data), 0
        for view in self.views(True, skip, len(data)):
            view[:] = data[done:done + len(view)]
            done += len(view)
        return done


class Virtqueue:
    def __init__(self, memory: GuestMemory, max_size: int = 256):
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} must be a power of two <= {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.event_idx = False
        self.last_avail = 0   # next avail ring slot we will consume (free-running u16)
        self.used_idx = 0     # our copy of used->idx, the guest may not change it
        self._signalled = 0   # used_idx when we last decided about an interrupt

    _STATE = ("size", "ready", "desc_addr", "avail_addr", "used_addr", "event_idx", "last_avail", "used_idx",
              "_signalled")

    def save_state(self) -> dict:
        """Ring addresses and our indices (the rings themselves live in guest RAM), for snapshots."""
        return {name.lstrip("_"): getattr(self, name) for name in self._STATE}

    def load_state(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, state[name.lstrip("_")])

    def validate(self) -> None:
        """Checked when the driver sets QueueReady, so later accesses only fail if the guest lies mid-flight."""
        if not 0 < self.size <= self.max_size or self.size & (self.size - 1):
            raise VirtqueueError(f"queue size {self.size} is not a power of two <= {self.max_size}")
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise VirtqueueError("misaligned ring address")
        # The +2 covers used_event / avail_event, which exist whether or not EVENT_IDX is negotiated.
        self.memory.view(self.desc_addr, DESC_SIZE * self.size)
        self.memory.view(self.avail_addr, 6 + 2 * self.size)
        self.memory.view(self.used_addr, 6 + 8 * self.size)

    def _avail_idx(self) -> int:
        return self.memory.read_u16(self.avail_addr + 2)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has posted nothing new."""
        if not self.ready:
            return None
        # avail_event: "kick me when you add anything past what I've consumed". Written before reading
        # avail->idx so that a buffer added right after our read still produces a kick.
        self._set_avail_event()
        pending = (self._avail_idx() - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"avail idx moved by {pending}, more than the queue size {self.size}")
        head = self.memory.read_u16(self.avail_addr + 4 + 2 * (self.last_avail % self.size))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self._set_avail_event()
        return DescriptorChain(self.memory, head, self._walk(head))

    def _set_avail_event(self) -> None:
        if self.event_idx:
            self.memory.write_u16(self.used_addr + 4 + 8 * self.size, self.last_avail)

    def _walk(self, head: int) -> list[Buffer]:
        table, entries, index = self.desc_addr, self.size, head
        indirect, seen, saw_write = False, 0, False
        buffers: list[Buffer] = []
        while True:
            if index >= entries:
                raise VirtqueueError(f"descriptor index {index} out of a table of {entries}")
            # Counting across indirect tables bounds the walk even when `next` fields form a cycle.
            seen += 1
            if seen > self.size:
                raise VirtqueueError(f"descriptor chain from head {head} is longer than the queue size {self.size}")
            addr, length, flags, nxt = _DESC.unpack(self.memory.view(table + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(f"indirect table length {length} is not a non-zero multiple of 16")
                self.memory.view(addr, length)
                table, entries, index, indirect = addr, length // DESC_SIZE, 0, True
                continue
            is_write = bool(flags & VIRTQ_DESC_F_WRITE)
            if saw_write and not is_write:
                raise VirtqueueError("device-readable descriptor after a device-writable one")
            saw_write |= is_write
            self.memory.view(addr, length)  # bounds check now, so devices see only valid buffers
            buffers.append(Buffer(addr, length, is_write))
            if not flags & VIRTQ_DESC_F_NEXT:
                return buffers
            index = nxt

    def push_used(self, head: int, written: int) -> None:
        slot = self.used_addr + 4 + 8 * (self.used_idx % self.size)
        self.memory.view(slot, 8)[:] = _USED_ELEM.pack(head, written)
        # The element must be in memory before the index that publishes it (x86 keeps stores in order).
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.memory.write_u16(self.used_addr + 2, self.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the used entries added since the last call warrant an interrupt; consumes them either way."""
        old, new = self._signalled, self.used_idx
        self._signalled = new
        if old == new:
            return False
        if self.event_idx:
            used_event = self.memory.read_u16(self.avail_addr + 4 + 2 * self.size)
            # vring_need_event: did used_idx step over used_event in (old, new]? All arithmetic mod 2^16.
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self.memory.read_u16(self.avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT
