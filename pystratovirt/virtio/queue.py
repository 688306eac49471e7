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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import PyStratoVirtError
from ..memory.guest import GuestMemory

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


# DescChain(...) runs a Python-level __new__; the walk builds one per chain, so it calls tuple's.
_new_chain = tuple.__new__


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

    The rings are accessed through one view of guest RAM at host offsets computed here once: the
    ring parts were checked to lie in RAM, and every index into them is reduced modulo the queue
    size, so no ring access needs a check of its own. Buffers named by descriptors are checked,
    each one, before a chain is returned; :meth:`host_offset` then translates their addresses
    without checking again. The view is guest memory's own (:meth:`GuestMemory.host_view`): it
    dies with the memory, so a queue never keeps RAM mapped.
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
        # Region 0 starts at guest address 0, host offset 0; above it, one constant shift.
        self._low_end = mem.regions[0].end
        self._high_shift = (mem.regions[1].offset - mem.regions[1].gpa) if len(mem.regions) > 1 else 0
        self._view: memoryview | None = mem.host_view()
        # Ring indices and event fields go through 16-bit words: a single load or store each, so
        # the driver never sees half of one (nor the 0 struct.pack_into writes before a value).
        self._words: memoryview | None = mem.host_view_u16()
        self._desc = mem.host_offset(desc_addr, DESC_SIZE * size)
        self._avail = mem.host_offset(avail_addr, 6 + 2 * size)   # flags, idx, ring[size], used_event
        self._used = mem.host_offset(used_addr, 6 + USED_ELEM_SIZE * size)  # flags, idx, ring, avail_event
        self._mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = 0     # next available ring entry the device will consume
        self.used_idx = 0           # the device's copy of used->idx
        self._avail_shadow = 0      # last avail->idx read; entries up to it are known available
        self._signalled_used: int | None = None  # used_idx when we last decided about an interrupt
        self._fence = threading.Lock()

    def close(self) -> None:
        """The owner is done with the queue; any later use raises QueueError."""
        self._view = self._words = None

    @property
    def _w(self) -> memoryview:
        words = self._words
        if words is None:
            raise QueueError("the queue is closed")
        return words

    @property
    def view(self) -> memoryview:
        """Guest RAM by host offset (see :meth:`host_offset`); valid until :meth:`close`."""
        view = self._view
        if view is None:
            raise QueueError("the queue is closed")
        return view

    def host_offset(self, addr: int) -> int:
        """Where guest address ``addr`` of a buffer of a chain this queue returned lies in
        :attr:`view` (the chain's buffers were checked against RAM when it was walked)."""
        return addr if addr < self._low_end else addr + self._high_shift

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
        idx = self._w[(self._avail + 2) >> 1]
        pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise QueueError(f"available index {idx} is {pending} entries ahead of the device's "
                             f"{self.last_avail_idx}, more than the queue size {self.size}")
        self._avail_shadow = idx
        return idx

    def pending(self) -> int:
        """How many chains the driver has made available that the device has not popped."""
        if self.event_idx:
            _full_barrier(self._fence)
        return (self._read_avail_idx() - self.last_avail_idx) & 0xFFFF

    def _available(self) -> int:
        """How many entries are known available, reading avail->idx again (after the barrier
        EVENT_IDX needs) only when the last read ones are used up."""
        last = self.last_avail_idx
        if last == self._avail_shadow:
            if self.event_idx:
                # avail_event was stored by the previous pop; it must be visible before we
                # load avail->idx, or a driver that just added a buffer and read the old
                # avail_event would skip its notification while we conclude the ring is empty.
                _full_barrier(self._fence)
            if self._read_avail_idx() == last:
                return 0
        return (self._avail_shadow - last) & 0xFFFF

    def pop(self) -> DescChain | None:
        """The next available chain, or None when the driver has made nothing more available."""
        if not self._available():
            return None
        words = self._w
        head = words[(self._avail + 4 + 2 * (self.last_avail_idx & self._mask)) >> 1]
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            # Ask to be notified when the driver makes the entry after this one available.
            words[(self._used + 4 + USED_ELEM_SIZE * self.size) >> 1] = self.last_avail_idx
        return chain

    def pop_batch(self, limit: int) -> list[DescChain]:
        """Up to ``limit`` available chains at once (what :meth:`pop` would return one by one;
        the available ring's entries are read in one go and avail_event is written once).

        With EVENT_IDX, avail_event is written after the batch and avail->idx read once more
        behind a barrier: a chain the driver added meanwhile (without a notification, since it
        saw the old avail_event) shows in :meth:`has_available`, so the caller comes back for it
        instead of waiting for a notification that will not come."""
        count = min(self._available(), limit)
        if count <= 0:
            return []
        view, mask, ring, walk = self.view, self._mask, self._avail + 4, self._walk
        first = self.last_avail_idx & mask
        if first + count <= self.size:
            heads = struct.unpack_from(f"<{count}H", view, ring + 2 * first)
        else:  # the entries wrap around the end of the ring
            heads = (struct.unpack_from(f"<{self.size - first}H", view, ring + 2 * first)
                     + struct.unpack_from(f"<{first + count - self.size}H", view, ring))
        chains = []
        try:
            for head in heads:
                chains.append(walk(head))
        except QueueError:
            # The chains walked before a bad one are the driver's good requests: hand them over
            # as :meth:`pop` would, and leave the bad one available, so the next call raises.
            if not chains:
                raise
        finally:
            self.last_avail_idx = (self.last_avail_idx + len(chains)) & 0xFFFF
            if self.event_idx and chains:
                self._w[(self._used + 4 + USED_ELEM_SIZE * self.size) >> 1] = self.last_avail_idx
        if self.event_idx and self.last_avail_idx == self._avail_shadow:
            _full_barrier(self._fence)
            try:
                self._read_avail_idx()
            except QueueError:
                # A driver that broke the ring meanwhile still gets the chains it made
                # available before; the next look at the index (the next pop) fails.
                pass
        return chains

    def has_available(self) -> bool:
        """Whether chains are known to be available (as of the last look at avail->idx)."""
        return self._avail_shadow != self.last_avail_idx

    def _walk(self, head: int) -> DescChain:
        """The chain starting at descriptor ``head``, every buffer checked against RAM. The
        common chain (direct descriptors only) is walked here; one that uses an indirect table
        is walked again by :meth:`_walk_general`."""
        size = self.size
        if head >= size:
            raise QueueError(f"available ring names descriptor {head}, past the table of {size}")
        view, table, low_end, unpack = self._view, self._desc, self._low_end, _DESC.unpack_from
        if view is None:
            raise QueueError("the queue is closed")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        index = head
        for _ in range(size):   # a chain longer than the table has a loop
            addr, length, flags, nxt = unpack(view, table + DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                return self._walk_general(head)
            # addr is a u64 and length a u32, so neither is negative: region 0 is [0, low_end).
            if addr + length > low_end and not self._in_ram(addr, length):
                raise QueueError(f"chain {head}: buffer [{addr:#x}, +{length:#x}) is outside guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise QueueError(f"chain {head}: device-readable buffer after a device-writable one")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return _new_chain(DescChain, (head, tuple(readable), tuple(writable)))
            if nxt >= size:
                raise QueueError(f"chain {head}: next descriptor {nxt} is past the table of {size}")
            index = nxt
        raise QueueError(f"descriptor chain from head {head} is longer than {size} descriptors (a loop)")

    def _walk_general(self, head: int) -> DescChain:
        size = self.size
        view = self.view
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        table, table_len, limit = self._desc, size, size
        in_indirect = False
        index, steps = head, 0
        while True:
            steps += 1
            if steps > limit:
                where = "indirect table" if in_indirect else "descriptor chain"
                raise QueueError(f"{where} from head {head} is longer than {limit} descriptors (a loop)")
            addr, length, flags, nxt = _DESC.unpack_from(view, table + DESC_SIZE * index)
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
                table, table_len = self.host_offset(addr), length // DESC_SIZE
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
        view = self.view
        # Element first, index second: x86 keeps stores in program order, so a driver that sees
        # the new index also sees the element.
        _USED_ELEM.pack_into(view, self._used + 4 + USED_ELEM_SIZE * (self.used_idx & self._mask),
                             head & 0xFFFF_FFFF, written & 0xFFFF_FFFF)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._w[(self._used + 2) >> 1] = self.used_idx

    def add_used_batch(self, used: Sequence[tuple[int, int]]) -> None:
        """Publish several (head, written) chains as used, with one index update at the end."""
        if not used:
            return
        view, ring, mask, idx = self.view, self._used + 4, self._mask, self.used_idx
        pack = _USED_ELEM.pack_into
        for head, written in used:
            pack(view, ring + USED_ELEM_SIZE * (idx & mask), head & 0xFFFF_FFFF, written & 0xFFFF_FFFF)
            idx += 1
        self.used_idx = idx & 0xFFFF
        self._w[(self._used + 2) >> 1] = self.used_idx

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer interrupt for what was added since the last call."""
        # used->idx was just stored; the driver's suppression field must be loaded after it.
        _full_barrier(self._fence)
        new = self.used_idx
        old, self._signalled_used = self._signalled_used, new
        if self.event_idx:
            if old is None:
                return True  # nothing known about the driver's wishes yet: be safe
            used_event = self._w[(self._avail + 4 + 2 * self.size) >> 1]
            return vring_need_event(used_event, new, old)
        if old == new:
            return False
        flags = self._w[self._avail >> 1]
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
