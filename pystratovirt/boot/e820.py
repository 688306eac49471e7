"""The BIOS-style e820 memory map the loader hands the kernel in the zero page.

RAM below 1 MiB is split the way a PC firmware would: the EBDA (which holds our MP table) and
the BIOS ROM area are reserved, and the legacy VGA/option-ROM window 0xa0000..0xf0000 is left out
of the map altogether, so the kernel never allocates any of those even though guest RAM backs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from ..memory.layout import BIOS_ROM_START, EBDA_END, EBDA_START, HIGH_MEMORY_START
from .bootparams import E820_MAX_ENTRIES_ZEROPAGE, E820_RAM, E820_RESERVED
from .errors import BootError


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def build_e820(regions: Iterable) -> list[E820Entry]:
    """The e820 table for RAM ``regions`` (objects with ``gpa`` and ``size``, e.g. GuestMemory.regions).

    The region at guest physical 0 must reach past 1 MiB: the boot structures and the kernel need it.
    """
    regions = sorted(regions, key=lambda r: r.gpa)
    if not regions or regions[0].gpa != 0 or regions[0].size <= HIGH_MEMORY_START:
        raise BootError("guest RAM must start at address 0 and extend past 1 MiB to boot a kernel")
    low = regions[0]
    table = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, EBDA_END - EBDA_START, E820_RESERVED),
        E820Entry(BIOS_ROM_START, HIGH_MEMORY_START - BIOS_ROM_START, E820_RESERVED),
        E820Entry(HIGH_MEMORY_START, low.gpa + low.size - HIGH_MEMORY_START, E820_RAM),
    ]
    for region in regions[1:]:
        if region.size:
            table.append(E820Entry(region.gpa, region.size, E820_RAM))
    if len(table) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"the memory map has {len(table)} ranges, more than the zero page's "
                        f"{E820_MAX_ENTRIES_ZEROPAGE}")
    return table
