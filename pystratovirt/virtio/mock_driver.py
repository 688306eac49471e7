"""A mock guest: a minimal virtio driver in Python, for unit tests and benchmarks without KVM.

Owns nothing the VMM uses at run time. It plays Linux's part against a transport through its
register interface (``read``/``write`` as a vCPU's MMIO accesses would), lays out split rings in
a :class:`GuestMemory`, posts descriptor chains, notifies through QueueNotify (the MMIO-exit path,
which wakes the same eventfd KVM's ioeventfd would) and waits on the interrupt eventfd.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..memory.guest import GuestMemory
from . import mmio as r
from .device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    bit,
)
from .mmio import VirtioMmio
from .queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, vring_need_event

_DESC = struct.Struct("<QIHH")


class DriverError(Exception):
    """The device refused something the driver asked for, or did not answer in time."""


@dataclass
class DriverQueue:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0
    chains: dict[int, list[int]] = field(default_factory=dict)  # head -> descriptors to free


class Allocator:
    """A bump allocator over a guest physical range."""

    def __init__(self, base: int, size: int):
        self.base, self.end, self.next = base, base + size, base

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise DriverError(f"driver memory exhausted allocating {size} bytes")
        self.next = addr + size
        return addr

    def reset(self) -> None:
        self.next = self.base


class VirtioDriver:
    """Drives one virtio-mmio transport. Rings live at ``ring_base``; ``alloc`` hands out
    buffer memory from ``[data_base, data_base + data_size)``."""

    def __init__(self, transport: VirtioMmio, mem: GuestMemory, *, ring_base: int = 0x10_0000,
                 data_base: int = 0x20_0000, data_size: int = 0x40_0000):
        self.t = transport
        self.mem = mem
        self.ring_alloc = Allocator(ring_base, data_base - ring_base)
        self.data = Allocator(data_base, data_size)
        self.queues: list[DriverQueue] = []
        self.features = 0

    # -- registers --------------------------------------------------------------------------------
    def rd(self, reg: int) -> int:
        return self.t.read(reg, 4)

    def wr(self, reg: int, value: int) -> None:
        self.t.write(reg, 4, value)

    def device_features(self) -> int:
        self.wr(r.DEVICE_FEATURES_SEL, 0)
        lo = self.rd(r.DEVICE_FEATURES)
        self.wr(r.DEVICE_FEATURES_SEL, 1)
        return lo | (self.rd(r.DEVICE_FEATURES) << 32)

    def write_features(self, features: int) -> None:
        self.wr(r.DRIVER_FEATURES_SEL, 0)
        self.wr(r.DRIVER_FEATURES, features & 0xFFFF_FFFF)
        self.wr(r.DRIVER_FEATURES_SEL, 1)
        self.wr(r.DRIVER_FEATURES, features >> 32)

    def status(self) -> int:
        return self.rd(r.STATUS)

    def add_status(self, bits: int) -> None:
        self.wr(r.STATUS, self.status() | bits)

    def read_config(self, offset: int, size: int) -> int:
        return self.t.read(r.CONFIG + offset, size)

    # -- initialisation (spec §3.1.1) --------------------------------------------------------------
    def initialize(self, *, want: int | None = None, queue_size: int | None = None) -> int:
        """Reset, negotiate ``want & offered`` (default: everything offered), set up every queue,
        DRIVER_OK. Returns the negotiated features."""
        if self.rd(r.MAGIC) != r.MAGIC_VALUE or self.rd(r.VERSION) != 2:
            raise DriverError("not a virtio-mmio version 2 device")
        self.wr(r.STATUS, 0)
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        offered = self.device_features()
        features = offered if want is None else offered & want
        features |= bit(VIRTIO_F_VERSION_1)
        self.write_features(features)
        self.add_status(STATUS_FEATURES_OK)
        if not self.status() & STATUS_FEATURES_OK:
            raise DriverError("device refused the features")
        self.features = features
        self.queues = []
        self.ring_alloc.reset()
        index = 0
        while True:
            self.wr(r.QUEUE_SEL, index)
            max_size = self.rd(r.QUEUE_NUM_MAX)
            if not max_size:
                break
            self.queues.append(self.setup_queue(index, min(max_size, queue_size or max_size)))
            index += 1
        self.add_status(STATUS_DRIVER_OK)
        return features

    def setup_queue(self, index: int, size: int) -> DriverQueue:
        desc = self.ring_alloc.alloc(16 * size, 4096)
        avail = self.ring_alloc.alloc(6 + 2 * size, 2)
        used = self.ring_alloc.alloc(6 + 8 * size, 4096)
        self.mem.fill(desc, 16 * size)
        self.mem.fill(avail, 6 + 2 * size)
        self.mem.fill(used, 6 + 8 * size)
        self.wr(r.QUEUE_SEL, index)
        if self.rd(r.QUEUE_READY):
            raise DriverError(f"queue {index} is already in use")
        self.wr(r.QUEUE_NUM, size)
        for low, value in ((r.QUEUE_DESC_LOW, desc), (r.QUEUE_DRIVER_LOW, avail), (r.QUEUE_DEVICE_LOW, used)):
            self.wr(low, value & 0xFFFF_FFFF)
            self.wr(low + 4, value >> 32)
        self.wr(r.QUEUE_READY, 1)
        return DriverQueue(index, size, desc, avail, used, free=list(range(size)))

    # -- buffers ----------------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        return self.data.alloc(size, align)

    def put(self, data: bytes, align: int = 16) -> int:
        addr = self.alloc(max(len(data), 1), align)
        self.mem.write(addr, data)
        return addr

    def submit(self, qi: int, out: list[tuple[int, int]], inp: list[tuple[int, int]], *,
               indirect: bool = False, publish: bool = True) -> int:
        """Post one chain of device-readable ``out`` and device-writable ``inp`` (gpa, len)
        buffers; returns its head. ``publish=False`` leaves avail->idx for :meth:`publish`."""
        q = self.queues[qi]
        elems = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in inp]
        if indirect:
            table = self.alloc(16 * len(elems), 16)
            for i, (a, n, flags) in enumerate(elems):
                last = i == len(elems) - 1
                self.mem.write(table + 16 * i, _DESC.pack(a, n, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                                                          0 if last else i + 1))
            elems = [(table, 16 * len(elems), VIRTQ_DESC_F_INDIRECT)]
        if len(elems) > len(q.free):
            raise DriverError("not enough free descriptors")
        ids = [q.free.pop() for _ in elems]
        for i, (a, n, flags) in enumerate(elems):
            last = i == len(elems) - 1
            self.mem.write(q.desc + 16 * ids[i], _DESC.pack(a, n, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                                                            0 if last else ids[i + 1]))
        head = ids[0]
        q.chains[head] = ids
        slot = q.avail_idx % q.size
        self.mem.write_u16(q.avail + 4 + 2 * slot, head)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish(qi)
        return head

    def publish(self, qi: int) -> None:
        q = self.queues[qi]
        self.mem.write_u16(q.avail + 2, q.avail_idx)

    def set_used_event(self, qi: int, value: int) -> None:
        q = self.queues[qi]
        self.mem.write_u16(q.avail + 4 + 2 * q.size, value)

    def avail_event(self, qi: int) -> int:
        q = self.queues[qi]
        return self.mem.read_u16(q.used + 4 + 8 * q.size)

    def notify(self, qi: int) -> None:
        self.wr(r.QUEUE_NOTIFY, qi)

    def used_idx(self, qi: int) -> int:
        return self.mem.read_u16(self.queues[qi].used + 2)

    def take_used(self, qi: int) -> list[tuple[int, int]]:
        """Used elements not seen yet; their descriptors go back to the free list."""
        q = self.queues[qi]
        out = []
        idx = self.used_idx(qi)
        while q.last_used != idx:
            slot = q.last_used % q.size
            head, length = struct.unpack("<II", self.mem.read(q.used + 4 + 8 * slot, 8))
            out.append((head, length))
            q.free.extend(q.chains.pop(head, []))
            q.last_used = (q.last_used + 1) & 0xFFFF
        return out

    def wait_irq(self, timeout: float = 5.0) -> int:
        """Wait for the interrupt eventfd; returns InterruptStatus (acknowledged), 0 on timeout."""
        fd = self.t.irq_eventfd
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return 0
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        status = self.rd(r.INTERRUPT_STATUS)
        self.wr(r.INTERRUPT_ACK, status)
        return status

    def wait_used(self, qi: int, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Collect ``count`` used elements, sleeping on the interrupt between checks."""
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        event_idx = bool(self.features & bit(VIRTIO_RING_F_EVENT_IDX))
        while True:
            got += self.take_used(qi)
            if len(got) >= count:
                return got
            if event_idx:
                # As Linux's virtqueue_enable_cb: ask for an interrupt when the next entry is
                # used, then look again in case it was used before the device could see that.
                self.set_used_event(qi, self.queues[qi].last_used)
                got += self.take_used(qi)
                if len(got) >= count:
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise DriverError(f"only {len(got)} of {count} used buffers after {timeout} s")
            # The short timeout is only a safety net; a correct device interrupts first.
            self.wait_irq(min(left, 0.5))


# -- virtio-blk requests ---------------------------------------------------------------------------
BLK_HEADER = struct.Struct("<IIQ")


class BlkDriver(VirtioDriver):
    """Block requests on queue 0, one at a time or posted in batches."""

    def request(self, rtype: int, sector: int = 0, *, out: bytes | None = None, in_len: int = 0,
                indirect: bool = False, split: int | None = None) -> tuple[int, bytes, int]:
        """Run one request; returns (status, data read, used length). ``split`` cuts the data
        buffer into descriptors of that many bytes (to exercise scatter/gather)."""
        head, status_addr, in_addr = self.post(rtype, sector, out=out, in_len=in_len,
                                               indirect=indirect, split=split)
        self.notify(0)
        used = self.wait_used(0, 1)
        (uhead, ulen), = used
        assert uhead == head, (uhead, head)
        data = self.mem.read(in_addr, in_len) if in_len else b""
        return self.mem.read_u8(status_addr), data, ulen

    def post(self, rtype: int, sector: int = 0, *, out: bytes | None = None, in_len: int = 0,
             indirect: bool = False, split: int | None = None, publish: bool = True,
             out_addr: int | None = None, out_len: int = 0, in_addr: int | None = None
             ) -> tuple[int, int, int]:
        """Post a request without waiting; returns (head, status byte address, data-in address)."""
        hdr = self.put(BLK_HEADER.pack(rtype, 0, sector))
        outs = [(hdr, BLK_HEADER.size)]
        if out is not None:
            out_addr, out_len = self.put(out, 512), len(out)
        if out_addr is not None and out_len:
            outs += _pieces(out_addr, out_len, split)
        ins = []
        if in_len:
            if in_addr is None:
                in_addr = self.alloc(in_len, 512)
            ins += _pieces(in_addr, in_len, split)
        status = self.alloc(1, 1)
        self.mem.write_u8(status, 0xFF)
        ins.append((status, 1))
        head = self.submit(0, outs, ins, indirect=indirect, publish=publish)
        return head, status, in_addr or 0


def _pieces(addr: int, length: int, split: int | None) -> list[tuple[int, int]]:
    if not split:
        return [(addr, length)]
    return [(addr + off, min(split, length - off)) for off in range(0, length, split)]


class BulkRing:
    """One split ring driven in bulk from a view of guest RAM, as the benchmarks' driver
    processes do (forked after :meth:`VirtioDriver.initialize`, so without the driver's
    bookkeeping): heads made available in one write, used elements taken in one read, and Linux's
    EVENT_IDX habits for kicks and interrupts.

    ``ram`` views guest RAM from address 0 and ``words`` the same bytes as 16-bit words: the ring
    indices are single 16-bit loads and stores, as a Linux driver's are (``struct.pack_into``
    clears a field before it writes it, so the device could read 0 meanwhile)."""

    def __init__(self, q: DriverQueue, ram: memoryview, words: memoryview, notify_fd: int, irq_fd: int):
        self.ram, self.words, self.size = ram, words, q.size
        self.notify_fd, self.irq_fd = notify_fd, irq_fd
        self._avail_ring, self._used_ring = q.avail + 4, q.used + 4
        self._avail_idx_w, self._used_idx_w = (q.avail + 2) >> 1, (q.used + 2) >> 1
        self._used_event_w = (q.avail + 4 + 2 * q.size) >> 1
        self._avail_event_w = (q.used + 4 + 8 * q.size) >> 1
        self._poll = select.poll()
        self._poll.register(irq_fd, select.POLLIN)
        self.avail_idx = self.last_used = 0

    def post(self, heads: list[int]) -> None:
        """Make these chains available (one write of the entries, then the index)."""
        size, first, k = self.size, self.avail_idx % self.size, len(heads)
        if first + k <= size:
            struct.pack_into(f"<{k}H", self.ram, self._avail_ring + 2 * first, *heads)
        else:
            struct.pack_into(f"<{size - first}H", self.ram, self._avail_ring + 2 * first, *heads[:size - first])
            struct.pack_into(f"<{first + k - size}H", self.ram, self._avail_ring, *heads[size - first:])
        self.avail_idx = (self.avail_idx + k) & 0xFFFF
        self.words[self._avail_idx_w] = self.avail_idx

    def kick_if_asked(self, old: int) -> None:
        """EVENT_IDX: notify only if the device asked for it at an entry made available since
        ``avail_idx`` was ``old``."""
        if vring_need_event(self.words[self._avail_event_w], self.avail_idx, old):
            os.eventfd_write(self.notify_fd, 1)

    def take_used(self) -> tuple[int, ...]:
        """The heads of the chains used since the last call (none: an empty tuple)."""
        used = self.words[self._used_idx_w]
        last = self.last_used
        if used == last:
            return ()
        size, k, first = self.size, (used - last) & 0xFFFF, last % self.size
        if first + k <= size:
            elems = struct.unpack_from(f"<{2 * k}I", self.ram, self._used_ring + 8 * first)
        else:
            elems = (struct.unpack_from(f"<{2 * (size - first)}I", self.ram, self._used_ring + 8 * first)
                     + struct.unpack_from(f"<{2 * (first + k - size)}I", self.ram, self._used_ring))
        self.last_used = used
        return elems[::2]

    def sleep(self, timeout_ms: int) -> None:
        """As Linux does before it sleeps: ask for an interrupt at the next used entry, look once
        more (the device may have used it before it saw the request), then wait for it."""
        self.words[self._used_event_w] = self.last_used
        if self.words[self._used_idx_w] == self.last_used:
            self._poll.poll(timeout_ms)
            try:
                os.eventfd_read(self.irq_fd)
            except BlockingIOError:
                pass


class DriverProcess:
    """A benchmark's driver in a process of its own, as a guest runs on its own vCPUs: forked at
    construction (before the device's I/O thread exists, so the child is single-threaded), it
    runs ``drive(report_fd)``, which writes "<count> <elapsed seconds>" to the pipe;
    :meth:`result` waits for it. Guest RAM must be shared with the child (``GuestMemory.shared``)."""

    def __init__(self, drive: Callable[[int], None]):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read_fd)
                drive(write_fd)
            except BaseException as exc:
                os.write(write_fd, f"error {exc!r}\n".encode())
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pid, self._read_fd = pid, read_fd

    def result(self) -> tuple[int, float]:
        """The child's count and elapsed seconds, once it has exited; RuntimeError if it failed."""
        try:
            report = b""
            while chunk := os.read(self._read_fd, 256):
                report += chunk
        finally:
            os.close(self._read_fd)
            _, status = os.waitpid(self.pid, 0)
        text = report.decode().strip()
        if not text or text.startswith("error"):
            raise RuntimeError(f"the benchmark driver failed: {text or 'no report'} (status {status})")
        count, elapsed = text.split()
        return int(count), float(elapsed)
