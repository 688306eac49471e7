"""GuestMemory: the layout around the 32-bit hole, bounds checks, discard and pre-allocation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pystratovirt.memory import GuestMemory, GuestMemoryError
from pystratovirt.memory.layout import GiB, MiB, ram_ranges


def rss_of(mem: GuestMemory) -> int:
    start = mem.host_base
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and not line[0].isupper():
                lo = int(line.split("-")[0], 16)
                inside = lo == start
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


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
