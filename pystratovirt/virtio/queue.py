"""The split virtqueue (virtio 1.x §2.7) as a device sees it, over guest memory.

Owns: walking the driver's available descriptor chains into validated (guest address, length)
buffer lists, publishing used elements, and the notification-suppression rules in both
directions (``VIRTQ_AVAIL_F_NO_INTERRUPT`` and ``VIRTIO_F_EVENT_IDX``).

Everything in the rings is written by the guest and is hostile. Every address and length is
checked against guest RAM *before* it is read, chains are bounded (loops cannot hang the device),
and any inconsistency raises :class:`QueueError`; the transport then marks the device
DEVICE_NEEDS_RESET. No other exception leaves this module for guest-controlled input.

Threading: a queue is used by one thread at a time (its device's I/O thread, with the device
lock held); it has no lock of its own.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import PyStratoVirtError
from ..memory.guest import GuestMemory, GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
MAX_QUEUE_SIZE = 32768
# ``next`` is a u16, so no chain inside one table can visit more than 65536 distinct entries;
# walking more steps than that (or than the table has) proves a loop.
MAX_TABLE_STEPS = 1 << 16

# Minimum alignment of each ring part (spec §2.7, table "Virtqueue Part / Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class QueueError(PyStratoVirtError):
    """The driver's virtqueue is malformed; the device must stop using it until reset."""


Buffers = tuple[tuple[int, int], ...]


class DescChain(NamedTuple):
    """One available descriptor chain: its head index and its device-readable and
    device-writable buffers as (guest physical address, length) pairs, in chain order."""

    head: int
    readable: Buffers
    writable: Buffers

    @property
    def readable_len(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True if moving an index from ``old`` to ``new`` passed ``event`` (all u16, wrapping).

    This is the EVENT_IDX rule: notify when the entry numbered ``event`` was written, i.e. when
    ``event`` lies in the half-open window [old, new) modulo 2**16.
    """
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _full_barrier(fence: threading.Lock) -> None:
    # A store followed by a load of a different location may be reordered even on x86 (the store
    # buffer); the driver/device notification protocol needs a full fence there. Python has no
    # fence primitive, but acquiring and releasing a lock executes locked read-modify-write
    # instructions (glibc's semaphore/futex fast paths), and on x86-64 each of those is a full
    # memory barrier.
    fence.acquire()
    fence.release()


@dataclass(frozen=True)
class QueueState:
    """A split queue as a value (for snapshots): where the driver put its three parts, the ring
    features it negotiated, and how far the device has got. ``signalled_used`` is the used
    index at the last interrupt decision (None before the first), which the EVENT_IDX rule
    compares against; ``last_avail_idx`` may lie behind the live queue's when the device gave
    chains it had popped but not completed back to the ring (see :meth:`SplitQueue.save_state`).
    """

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: bool
    indirect: bool
    last_avail_idx: int
    used_idx: int
    signalled_used: int | None


class SplitQueue:
    """A driver-configured split virtqueue, validated at construction.

    ``size`` must be a power of two (the ring indices wrap at 2**16, which only maps onto the
    ring consistently for a power-of-two size); every ring part must be aligned and lie in RAM.
    ``event_idx`` and ``indirect`` are the negotiated VIRTIO_F_EVENT_IDX / VIRTIO_F_INDIRECT_DESC.
    """

    def __init__(self, mem: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, event_idx: bool = False, indirect: bool = False):
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two between 1 and {MAX_QUEUE_SIZE}")
        for name, addr, align, length in (("descriptor table", desc_addr, DESC_ALIGN, DESC_SIZE * size),
                                          ("available ring", avail_addr, AVAIL_ALIGN, 6 + 2 * size),
                                          ("used ring", used_addr, USED_ALIGN, 6 + USED_ELEM_SIZE * size)):
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not mem.contains(addr, length):
                raise QueueError(f"{name} [{addr:#x}, +{length:#x}) is outside guest RAM")
        self.mem = mem
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        # Guest RAM as (start, end) pairs: the buffer check below runs for every descriptor.
        self._ram = tuple((region.gpa, region.end) for region in mem.regions)
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = 0     # next available ring entry the device will consume
        self.used_idx = 0           # the device's copy of used->idx
        self._avail_shadow = 0      # last avail->idx read; entries up to it are known available
        self._signalled_used: int | None = None  # used_idx when we last decided about an interrupt
        self._fence = threading.Lock()

    def close(self) -> None:
        """The owner is done with the queue (it keeps no host resources; kept for symmetry)."""

    # -- state as a value ------------------------------------------------------------------------
    def save_state(self, unfinished: int = 0) -> QueueState:
        """The queue as a value. ``unfinished``: how many of the chains popped last the device
        still holds without having completed them (a NIC's cached receive buffers, say); the
        value's ``last_avail_idx`` is moved back over them, so a queue restored from it pops them
        again from the available ring, where the driver's entries still name them (a driver
        cannot reuse a ring slot while its chain is outstanding). The live queue is not changed.
        """
        outstanding = (self.last_avail_idx - self.used_idx) & 0xFFFF
        if not 0 <= unfinished <= outstanding:
            raise ValueError(f"cannot give back {unfinished} chains: the device has popped only "
                             f"{outstanding} it has not used")
        return QueueState(self.size, self.desc_addr, self.avail_addr, self.used_addr, self.event_idx,
                          self.indirect, (self.last_avail_idx - unfinished) & 0xFFFF, self.used_idx,
                          self._signalled_used)

    @classmethod
    def from_state(cls, mem: GuestMemory, state: QueueState) -> SplitQueue:
        """A queue continuing from ``state``; the geometry is validated as for a new queue
        (QueueError), the indices must be u16 values (ValueError)."""
        for name in ("last_avail_idx", "used_idx"):
            value = getattr(state, name)
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"queue {name} {value} is not a 16-bit index")
        if state.signalled_used is not None and not 0 <= state.signalled_used <= 0xFFFF:
            raise ValueError(f"queue signalled_used {state.signalled_used} is not a 16-bit index")
        if ((state.last_avail_idx - state.used_idx) & 0xFFFF) > state.size:
            raise ValueError(f"queue indices avail {state.last_avail_idx} and used {state.used_idx} "
                             f"are more than the queue size {state.size} apart")
        queue = cls(mem, state.size, state.desc_addr, state.avail_addr, state.used_addr,
                    event_idx=state.event_idx, indirect=state.indirect)
        queue.last_avail_idx = state.last_avail_idx
        queue._avail_shadow = state.last_avail_idx
        queue.used_idx = state.used_idx
        queue._signalled_used = state.signalled_used
        return queue

    def _in_ram(self, addr: int, length: int) -> bool:
        end = addr + length
        for start, stop in self._ram:
            if start <= addr and end <= stop:
                return True
        return False

    # -- consuming available chains --------------------------------------------------------------
    def _read_avail_idx(self) -> int:
        idx = self.mem.read_u16(self.avail_addr + 2)
        pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise QueueError(f"available index {idx} is {pending} entries ahead of the device's "
                             f"{self.last_avail_idx}, more than the queue size {self.size}")
        self._avail_shadow = idx
        return idx

    def pending(self) -> int:
        """How many chains the driver has made available that the device has not popped."""
        try:
            if self.event_idx:
                _full_barrier(self._fence)
            return (self._read_avail_idx() - self.last_avail_idx) & 0xFFFF
        except GuestMemoryError as exc:  # unreachable: the ring was validated; belt and braces
            raise QueueError(str(exc)) from None

    def pop(self) -> DescChain | None:
        """The next available chain, or None when the driver has made nothing more available."""
        try:
            if self.last_avail_idx == self._avail_shadow:
                if self.event_idx:
                    # avail_event was stored by the previous pop; it must be visible before we
                    # load avail->idx, or a driver that just added a buffer and read the old
                    # avail_event would skip its notification while we conclude the ring is empty.
                    _full_barrier(self._fence)
                if self._read_avail_idx() == self.last_avail_idx:
                    return None
            slot = self.last_avail_idx % self.size
            head = self.mem.read_u16(self.avail_addr + 4 + 2 * slot)
            chain = self._walk(head)
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            if self.event_idx:
                # Ask to be notified when the driver makes the entry after this one available.
                self.mem.write_u16(self.used_addr + 4 + USED_ELEM_SIZE * self.size, self.last_avail_idx)
            return chain
        except GuestMemoryError as exc:  # unreachable: everything is checked before access
            raise QueueError(str(exc)) from None

    def _walk(self, head: int) -> DescChain:
        if head >= self.size:
            raise QueueError(f"available ring names descriptor {head}, past the table of {self.size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        table, table_len, limit = self.desc_addr, self.size, self.size
        in_indirect = False
        index, steps = head, 0
        while True:
            steps += 1
            if steps > limit:
                where = "indirect table" if in_indirect else "descriptor chain"
                raise QueueError(f"{where} from head {head} is longer than {limit} descriptors (a loop)")
            addr, length, flags, nxt = _DESC.unpack(self.mem.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise QueueError(f"chain {head}: indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise QueueError(f"chain {head}: indirect descriptor but VIRTIO_F_INDIRECT_DESC "
                                     "was not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"chain {head}: indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(f"chain {head}: indirect table length {length} is not a "
                                     f"non-zero multiple of {DESC_SIZE}")
                if not self._in_ram(addr, length):
                    raise QueueError(f"chain {head}: indirect table [{addr:#x}, +{length:#x}) is "
                                     "outside guest RAM")
                # The WRITE flag of the descriptor naming the table is ignored (spec §2.7.5.3.2).
                table, table_len = addr, length // DESC_SIZE
                limit = min(table_len, MAX_TABLE_STEPS)
                in_indirect = True
                index, steps = 0, 0
                continue
            if not self._in_ram(addr, length):
                raise QueueError(f"chain {head}: buffer [{addr:#x}, +{length:#x}) is outside guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise QueueError(f"chain {head}: device-readable buffer after a device-writable one")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescChain(head, tuple(readable), tuple(writable))
            if nxt >= table_len:
                raise QueueError(f"chain {head}: next descriptor {nxt} is past the table of {table_len}")
            index = nxt

    # -- returning used chains -------------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Publish chain ``head`` as used with ``written`` bytes written to its writable buffers."""
        slot = self.used_idx % self.size
        # Element first, index second: x86 keeps stores in program order, so a driver that sees
        # the new index also sees the element.
        self.mem.write(self.used_addr + 4 + USED_ELEM_SIZE * slot,
                       _USED_ELEM.pack(head & 0xFFFF_FFFF, written & 0xFFFF_FFFF))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.write_u16(self.used_addr + 2, self.used_idx)

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer interrupt for what was added since the last call."""
        # used->idx was just stored; the driver's suppression field must be loaded after it.
        _full_barrier(self._fence)
        new = self.used_idx
        old, self._signalled_used = self._signalled_used, new
        if self.event_idx:
            if old is None:
                return True  # nothing known about the driver's wishes yet: be safe
            used_event = self.mem.read_u16(self.avail_addr + 4 + 2 * self.size)
            return vring_need_event(used_event, new, old)
        if old == new:
            return False
        flags = self.mem.read_u16(self.avail_addr)
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT


# -- helpers for devices: moving bytes in and out of buffer lists -----------------------------------
def split_buffers(bufs: Buffers, n: int) -> tuple[Buffers, Buffers]:
    """Split a buffer list after its first ``n`` bytes (a buffer may be cut in two)."""
    head: list[tuple[int, int]] = []
    tail: list[tuple[int, int]] = []
    left = n
    for addr, length in bufs:
        if left >= length:
            head.append((addr, length))
            left -= length
        elif left > 0:
            head.append((addr, left))
            tail.append((addr + left, length - left))
            left = 0
        else:
            tail.append((addr, length))
    return tuple(head), tuple(tail)


def read_buffers(mem: GuestMemory, bufs: Buffers, limit: int | None = None) -> bytes:
    """The bytes of ``bufs`` in order (at most ``limit`` of them)."""
    out = bytearray()
    for addr, length in bufs:
        if limit is not None:
            remaining = limit - len(out)
            if remaining <= 0:
                break
            length = min(length, remaining)  # a zero-length buffer is skipped, not the end
        out += mem.read(addr, length)
    return bytes(out)


def write_buffers(mem: GuestMemory, bufs: Buffers, data: bytes | bytearray | memoryview) -> int:
    """Scatter ``data`` over ``bufs``; returns how many bytes fitted."""
    view = memoryview(data)
    done = 0
    for addr, length in bufs:
        if done >= len(view):
            break
        chunk = view[done:done + length]
        mem.write(addr, chunk)
        done += len(chunk)
    return done
