"""The e820 map for typical VM sizes, from real GuestMemory region lists."""

import itertools

import pytest

from pystratovirt.boot import BootError
from pystratovirt.boot.bootparams import E820_RAM, E820_RESERVED
from pystratovirt.boot.e820 import E820Entry, build_e820
from pystratovirt.memory import GuestMemory, Region
from pystratovirt.memory.layout import GiB, MiB

LOW_FIXED = [
    E820Entry(0, 0x9FC00, E820_RAM),
    E820Entry(0x9FC00, 0x400, E820_RESERVED),
    E820Entry(0xF0000, 0x10000, E820_RESERVED),
]


@pytest.mark.parametrize("size,expected_tail", [
    (256 * MiB, [E820Entry(0x100000, 256 * MiB - 0x100000, E820_RAM)]),
    (3 * GiB, [E820Entry(0x100000, 3 * GiB - 0x100000, E820_RAM)]),
    (4 * GiB, [E820Entry(0x100000, 3 * GiB - 0x100000, E820_RAM),
               E820Entry(4 * GiB, 1 * GiB, E820_RAM)]),
    (6 * GiB, [E820Entry(0x100000, 3 * GiB - 0x100000, E820_RAM),
               E820Entry(4 * GiB, 3 * GiB, E820_RAM)]),
])
def test_e820(size, expected_tail):
    mem = GuestMemory(size)
    try:
        table = build_e820(mem.regions)
    finally:
        mem.close()
    assert table == LOW_FIXED + expected_tail
    # every RAM byte of the map is guest RAM, and nothing overlaps
    for a, b in itertools.pairwise(table):
        assert a.end <= b.addr
    ram = sum(e.size for e in table if e.type == E820_RAM)
    assert ram == size - (0x100000 - 0x9FC00)


def test_e820_needs_ram_past_1mib():
    with pytest.raises(BootError):
        build_e820([Region(0, 0, 0x80000, 0)])
    with pytest.raises(BootError):
        build_e820([])
