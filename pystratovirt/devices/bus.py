"""Address buses that route a vCPU's port I/O and MMIO exits to device models.

A device covers one range on a bus and implements ``read(offset, size) -> int`` and
``write(offset, size, value)``. Accesses that hit no device read as all ones and are ignored on
write, like an empty ISA bus: guests probe for hardware that is not there.

A bus is filled while the machine is built, before any vCPU runs, and never changes afterwards
(hot-plug swaps backends behind fixed devices), so lookups from several vCPU threads need no lock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    """A device range overlaps another one."""


@dataclass(frozen=True)
class _Range:
    base: int
    length: int
    device: BusDevice

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """A sorted set of non-overlapping device ranges (filled at build; read-only afterwards)."""

    def __init__(self, name: str):
        self.name = name
        self._bases: list[int] = []
        self._ranges: list[_Range] = []

    def insert(self, base: int, length: int, device: BusDevice) -> None:
        """Add a device range (while the machine is built)."""
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        i = bisect.bisect_right(self._bases, base)
        before = self._ranges[i - 1] if i else None
        after = self._ranges[i] if i < len(self._ranges) else None
        if (before and before.end > base) or (after and base + length > after.base):
            raise BusError(f"{self.name}: range [{base:#x}, +{length:#x}) overlaps another device")
        self._bases.insert(i, base)
        self._ranges.insert(i, _Range(base, length, device))

    def lookup(self, addr: int, size: int = 1) -> tuple[BusDevice, int] | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        if addr + size > r.end:
            return None
        return r.device, addr - r.base

    # read and write are every port-I/O and MMIO exit's way to its device: the range that
    # answered last is tried first (a guest talks to one device many times in a row, the UART
    # above all), then the bisection. The remembered range is a read-only tuple, so vCPU threads
    # sharing the bus at most miss it.
    _last: _Range | None = None

    def read(self, addr: int, size: int) -> int:
        r = self._last
        if r is None or not r.base <= addr or addr + size > r.base + r.length:
            r = self._find(addr, size)
            if r is None:
                return (1 << (8 * size)) - 1
        return r.device.read(addr - r.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        r = self._last
        if r is None or not r.base <= addr or addr + size > r.base + r.length:
            r = self._find(addr, size)
            if r is None:
                return
        r.device.write(addr - r.base, size, value)

    def _find(self, addr: int, size: int) -> _Range | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        if addr + size > r.base + r.length:
            return None
        self._last = r
        return r
