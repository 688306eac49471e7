"""The identity map: walk it like the MMU would."""

import struct

from pystratovirt.boot.pagetables import page_tables, write_page_tables
from pystratovirt.memory import GuestMemory
from pystratovirt.memory.layout import PD_ADDR, PD_COUNT, PDPT_ADDR, PML4_ADDR, GiB, MiB


def walk(mem, vaddr):
    """Translate through PML4 -> PDPT -> PD (2 MiB pages); None if not mapped."""
    e = mem.read_u64(PML4_ADDR + ((vaddr >> 39) & 0x1FF) * 8)
    if not e & 1:
        return None
    e = mem.read_u64((e & ~0xFFF & (1 << 52) - 1) + ((vaddr >> 30) & 0x1FF) * 8)
    if not e & 1:
        return None
    e = mem.read_u64((e & ~0xFFF & (1 << 52) - 1) + ((vaddr >> 21) & 0x1FF) * 8)
    if not e & 1:
        return None
    assert e & 0x83 == 0x83  # present, writable, 2 MiB page
    return (e & ~0x1FFFFF & (1 << 52) - 1) | (vaddr & 0x1FFFFF)


def test_tables_layout():
    pages = dict(page_tables())
    assert set(pages) == {PML4_ADDR, PDPT_ADDR, *(PD_ADDR + i * 4096 for i in range(PD_COUNT))}
    assert all(len(p) == 4096 for p in pages.values())
    pml4 = struct.unpack("<512Q", pages[PML4_ADDR])
    assert pml4[0] == PDPT_ADDR | 3 and not any(pml4[1:])
    pdpt = struct.unpack("<512Q", pages[PDPT_ADDR])
    assert pdpt[:PD_COUNT] == tuple(PD_ADDR + i * 4096 | 3 for i in range(PD_COUNT))
    assert not any(pdpt[PD_COUNT:])
    pd1 = struct.unpack("<512Q", pages[PD_ADDR + 4096])
    assert pd1[0] == 1 * GiB | 0x83 and pd1[511] == (1 * GiB + 511 * 2 * MiB) | 0x83


def test_identity_map_of_first_4gib():
    mem = GuestMemory(128 * MiB)
    try:
        write_page_tables(mem)
        for addr in (0, 0x7000, 0x100_0000 + 0x1234, 0xBFFF_FFFF, 0xC000_0000, 0xFEE0_0000,
                     0xFFFF_FFFF):
            assert walk(mem, addr) == addr
        assert walk(mem, 4 * GiB) is None
    finally:
        mem.close()
