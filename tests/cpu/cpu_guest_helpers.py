"""Test helpers: a tiny long-mode VM (GuestMemory, boot GDT, identity-mapped page tables).

The tests assemble guest code by hand as hex strings; the comments next to each string give the
instructions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pystratovirt.boot import gdt
from pystratovirt.kvm import IoOut, Kvm, Vm
from pystratovirt.memory import GuestMemory, layout

CODE_ADDR = 0x10_0000
TEST_IDT_ADDR = 0x3000


@dataclass
class LongModeVm:
    vm: Vm
    memory: GuestMemory

    def close(self) -> None:
        self.vm.close()
        self.memory.close()


def make_vm(kvm: Kvm, *, irqchip: bool = True, pit: bool = False, size: int = 4 << 20,
            memory: GuestMemory | None = None) -> LongModeVm:
    """A VM with ``size`` bytes of RAM, the boot GDT and page tables identity-mapping 1 GiB.

    Given ``memory`` (say, RAM mapped from a saved file), the VM uses it as it is: the tables are
    expected to be in it already.
    """
    vm = kvm.create_vm()
    fresh = memory is None
    memory = GuestMemory(size) if memory is None else memory
    for region in memory.regions:
        vm.set_user_memory_region(region.slot, region.gpa, region.size,
                                  memory.host_base + region.offset)
    vm.set_tss_addr(layout.TSS_ADDR)
    vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
    if irqchip:
        vm.create_irqchip()
    if pit:
        vm.create_pit2(speaker_dummy=True)
    if fresh:
        write_boot_tables(memory)
    return LongModeVm(vm, memory)


def write_boot_tables(memory: GuestMemory) -> None:
    """The boot GDT and page tables identity-mapping the first GiB."""
    memory.write(layout.GDT_ADDR, gdt.gdt_bytes())
    memory.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | 0x3)       # present, writable
    memory.write_u64(layout.PDPT_ADDR, layout.PD_ADDR | 0x3)
    for i in range(512):
        memory.write_u64(layout.PD_ADDR + 8 * i, (i << 21) | 0x83)  # 2 MiB page, present, RW


def map_lapic_page(memory: GuestMemory) -> None:
    """Add the LAPIC's MMIO page (0xfee00000, uncached) to make_vm's page tables."""
    pd = layout.PD_ADDR + 3 * 0x1000  # the page directory for the fourth GiB
    memory.write_u64(layout.PDPT_ADDR + 3 * 8, pd | 0x3)
    memory.write_u64(pd + 8 * ((layout.LAPIC_ADDR >> 21) & 0x1FF),
                     (layout.LAPIC_ADDR & ~0x1F_FFFF) | 0x93)  # 2 MiB page, present, RW, PCD


def idt_gate(handler: int, selector: int = gdt.CODE_SELECTOR) -> bytes:
    """A 64-bit interrupt gate (present, DPL 0, type 0xE)."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, 0x8E, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


def run_until_out(vcpu, port: int, limit: int = 50, on_exit=None) -> list:
    """Run until an IoOut to ``port``; returns every exit seen (the last one is that IoOut)."""
    seen = []
    for _ in range(limit):
        ex = vcpu.run()
        seen.append(ex)
        if isinstance(ex, IoOut) and ex.port == port:
            return seen
        if on_exit is not None:
            on_exit(ex)
    raise AssertionError(f"no OUT to port {port:#x} within {limit} exits: {seen}")
