"""The identity-mapping page tables the vCPU starts in long mode with (CR3 = layout.PML4_ADDR).

One PML4 entry -> one PDPT whose first PD_COUNT entries point at page directories of 2 MiB pages,
so guest virtual == guest physical for the first PD_COUNT GiB (4 GiB: the kernel, the boot
structures and the MMIO hole). The kernel replaces these with its own tables early on.
"""

from __future__ import annotations

import struct

from ..memory.layout import PAGE_SIZE, PD_ADDR, PD_COUNT, PDPT_ADDR, PML4_ADDR

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PS = 1 << 7          # in a page directory entry: this entry maps a 2 MiB page
ENTRIES_PER_TABLE = 512
LARGE_PAGE = 2 << 20


def page_tables() -> list[tuple[int, bytes]]:
    """(guest address, 4 KiB page) for the PML4, the PDPT and each page directory."""
    pml4 = struct.pack("<Q", PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE).ljust(PAGE_SIZE, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD_ADDR + i * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE)
                    for i in range(PD_COUNT)).ljust(PAGE_SIZE, b"\0")
    pages = [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt)]
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_PS
    for i in range(PD_COUNT):
        first = i * ENTRIES_PER_TABLE
        pd = struct.pack(f"<{ENTRIES_PER_TABLE}Q",
                         *(((first + j) * LARGE_PAGE) | flags for j in range(ENTRIES_PER_TABLE)))
        pages.append((PD_ADDR + i * PAGE_SIZE, pd))
    return pages


def write_page_tables(mem) -> None:
    for gpa, page in page_tables():
        mem.write(gpa, page)
