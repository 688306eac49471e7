"""Shared pieces of the virtio unit tests (no KVM): a guest memory that proves every access was
inside RAM, a hand-built split ring writer, and a small echo device for transport tests."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pystratovirt.memory.guest import GuestMemory
from pystratovirt.virtio.device import VirtioDevice, bit
from pystratovirt.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueError,
    read_buffers,
    write_buffers,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")


class SpyMemory(GuestMemory):
    """GuestMemory that records any access attempted outside RAM (it still raises)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.violations: list[tuple[str, int, int]] = []

    def _check(self, op: str, gpa: int, length: int) -> None:
        if not self.contains(gpa, length):
            self.violations.append((op, gpa, length))

    def read(self, gpa, length):
        self._check("read", gpa, length)
        return super().read(gpa, length)

    def write(self, gpa, data):
        self._check("write", gpa, len(data))
        return super().write(gpa, data)

    def view(self, gpa, length):
        self._check("view", gpa, length)
        return super().view(gpa, length)

    def read_u16(self, gpa):
        self._check("read_u16", gpa, 2)
        return super().read_u16(gpa)

    def write_u16(self, gpa, value):
        self._check("write_u16", gpa, 2)
        return super().write_u16(gpa, value)

    def read_u8(self, gpa):
        self._check("read_u8", gpa, 1)
        return super().read_u8(gpa)

    def write_u8(self, gpa, value):
        self._check("write_u8", gpa, 1)
        return super().write_u8(gpa, value)


def spied_memory(size: int) -> Iterator[SpyMemory]:
    """A fixture body: guest RAM for one test; afterwards no access may have been attempted
    outside it, and closing it fails if a device still holds views of it."""
    m = SpyMemory(size)
    yield m
    assert not m.violations, f"accesses outside guest RAM: {m.violations}"
    m.close()


class Ring:
    """Writes a split ring's driver-side structures by hand (descriptors, avail ring, used_event)."""

    def __init__(self, mem: GuestMemory, size: int, desc: int = 0x1000, avail: int = 0x2000,
                 used: int = 0x3000):
        self.mem, self.size, self.desc, self.avail, self.used = mem, size, desc, avail, used
        self.avail_idx = 0

    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                 table: int | None = None) -> None:
        self.mem.write((self.desc if table is None else table) + 16 * index,
                       DESC.pack(addr, length, flags, nxt))

    def push(self, head: int, publish: bool = True) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self, idx: int | None = None) -> None:
        self.mem.write_u16(self.avail + 2, self.avail_idx if idx is None else idx)

    def set_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (slot % self.size), 8))


class EchoDevice(VirtioDevice):
    """Device id 0x42 with two queues (16 and 8 entries): copies each chain's readable bytes
    into its writable buffers. A chain with no writable buffer is treated as malformed. Its
    config space is 8 bytes: a u32 the driver may write and a u32 the device changes."""

    device_id = 0x42
    queue_max_sizes = (16, 8)
    FEATURE_X = 3

    def __init__(self):
        super().__init__("echo")
        self._config = bytearray(8)
        self.processed = 0
        self.resets = 0
        self.activations = 0

    def device_features(self):
        return super().device_features() | bit(self.FEATURE_X)

    def write_config(self, offset, size, value):
        if offset == 0 and size == 4:
            self._update_config(0, value.to_bytes(4, "little"))

    def set_counter(self, value: int) -> None:
        self._update_config(4, value.to_bytes(4, "little"))

    def activate(self, mem, queues, interrupt, features):
        super().activate(mem, queues, interrupt, features)
        self.activations += 1

    def reset(self):
        super().reset()
        self.resets += 1

    def process_queue(self, index):
        q = self.queue(index)
        if q is None:
            return False
        n = 0
        while (chain := q.pop()) is not None:
            if not chain.writable:
                raise QueueError("echo chain without a writable buffer")
            data = read_buffers(self.mem, chain.readable)
            q.add_used(chain.head, write_buffers(self.mem, chain.writable, data))
            self.processed += 1
            n += 1
        if n:
            self.notify_used(q)
        return False
