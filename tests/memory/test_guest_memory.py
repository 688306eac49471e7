"""GuestMemory: the layout around the 32-bit hole, bounds checks, discard and pre-allocation."""

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pystratovirt.memory import GuestMemory, GuestMemoryError
from pystratovirt.memory.layout import GiB, MiB, ram_ranges


def rss_of(mem: GuestMemory) -> int:
    """Bytes of guest RAM resident in host memory: the present bit of each of the mapping's pages
    in /proc/self/pagemap (exactly this range; smaps would report a whole VMA, which the kernel
    may have merged with a neighbouring anonymous mapping)."""
    pages = mem.size // 4096
    with open("/proc/self/pagemap", "rb") as f:
        entries = os.pread(f.fileno(), pages * 8, (mem.host_base // 4096) * 8)
    present = sum(1 for (entry,) in struct.iter_unpack("<Q", entries) if entry >> 63)
    return present * 4096


def test_ram_ranges_split_at_the_hole():
    assert ram_ranges(256 * MiB) == [(0, 256 * MiB)]
    assert ram_ranges(3 * GiB) == [(0, 3 * GiB)]
    assert ram_ranges(4 * GiB) == [(0, 3 * GiB), (4 * GiB, 1 * GiB)]


def test_regions_are_contiguous_in_the_host_mapping():
    mem = GuestMemory(5 * GiB)
    low, high = mem.regions
    assert (low.gpa, low.size, low.offset) == (0, 3 * GiB, 0)
    assert (high.gpa, high.size, high.offset) == (4 * GiB, 2 * GiB, 3 * GiB)
    mem.write_u64(4 * GiB, 0x1122334455667788)
    assert mem.read(4 * GiB, 8) == bytes.fromhex("8877665544332211")
    assert mem.host_offset(4 * GiB) == 3 * GiB
    mem.close()


@pytest.mark.parametrize("gpa, length", [
    (3 * GiB - 4, 8),          # runs into the hole
    (3 * GiB, 1),              # inside the hole
    (6 * GiB - 1, 2),          # past the end of RAM
    (-1, 1),
    (0, -1),
    (2**64, 1),
])
def test_out_of_range_accesses_raise(gpa, length):
    mem = GuestMemory(5 * GiB)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, max(length, 0)) if length >= 0 else mem.view(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.write(gpa, b"\0" * max(length, 1)) if length > 0 else mem.host_address(gpa, length)
    mem.close()


@settings(max_examples=500, deadline=None)
@given(st.integers(-2**65, 2**65), st.integers(-10, 2**33))
def test_checks_hold_for_any_range(gpa, length):
    mem = GuestMemory(128 * MiB)
    try:
        inside = 0 <= gpa and 0 <= length and gpa + length <= 128 * MiB
        assert mem.contains(gpa, length) == inside
        if not inside:
            with pytest.raises(GuestMemoryError):
                mem.host_offset(gpa, length)
    finally:
        mem.close()


def test_discard_gives_memory_back_and_populate_takes_it():
    mem = GuestMemory(64 * MiB)
    assert rss_of(mem) < 4 * MiB
    mem.populate()
    assert rss_of(mem) >= 63 * MiB
    mem.write(0, b"data")
    mem.discard(0, 32 * MiB)
    assert rss_of(mem) <= 33 * MiB
    assert mem.read(0, 4) == b"\0\0\0\0"  # discarded private anonymous memory reads as zero
    with pytest.raises(GuestMemoryError):
        mem.discard(1, 4096)
    mem.close()
