"""The Intel MultiProcessor Specification 1.4 table that tells the guest its CPUs, IOAPIC and IRQ wiring.

The micro-VM has no ACPI, so Linux learns the CPU topology from this table. The MP floating
pointer ("_MP_") sits at the start of the EBDA (layout.EBDA_START, which Linux scans both directly
as "the last KiB of base memory" and through the BDA's EBDA pointer); the configuration table
("PCMP") follows it directly.

Size: 16 + 44 + 20 per CPU + 168 bytes, 5300 bytes for the 254-CPU maximum. Only CPUs up to 40
fit inside the 1 KiB EBDA proper; beyond that the table runs on into the legacy VGA/option-ROM
window (0xa0000..0xf0000), which the e820 map never reports as RAM and the kernel always treats as
reserved, while guest RAM still backs it. Linux memblock-reserves the table wherever it lies.
"""

from __future__ import annotations

import struct

from ..memory.layout import BIOS_ROM_START, EBDA_START, IOAPIC_ADDR, LAPIC_ADDR
from .errors import BootError

MAX_CPUS = 254           # APIC ids 0..253; 0xff is the broadcast id
SPEC_REV = 4             # MP spec 1.4
OEM_ID = b"PYSTRATO"     # 8 bytes
PRODUCT_ID = b"STRATOVIRT  "  # 12 bytes

# entry types
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

# processor flags
CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
CPU_SIGNATURE = 0x600            # family 6, model 0, stepping 0
CPU_FEATURES = 0x201             # FPU | APIC (CPUID.1:EDX bits 0 and 9)
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
IOAPIC_ENABLED = 1

# interrupt types
MP_INT = 0
MP_NMI = 1
MP_SMI = 2
MP_EXTINT = 3
MP_IRQ_CONFORMING = 0    # polarity and trigger "conform to the bus specification"

ISA_BUS_ID = 0
ISA_IRQS = 16
LINT_ALL_APICS = 0xFF

FLOATING_SIZE = 16
HEADER_SIZE = 44
PROCESSOR_SIZE = 20
SMALL_ENTRY_SIZE = 8


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` plus itself sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def mptable_size(max_cpus: int) -> int:
    return (FLOATING_SIZE + HEADER_SIZE + PROCESSOR_SIZE * max_cpus
            + SMALL_ENTRY_SIZE * (1 + 1 + ISA_IRQS + 2))



def ioapic_id(max_cpus: int) -> int:
    """The IOAPIC's id, shared by the MP table and the MADT: the one after the last vCPU's,
    but never 0xFF (the broadcast id), which max_cpus = 254 would otherwise give it."""
    return min(max_cpus + 1, MAX_CPUS)

def build_mptable(nr_cpus: int, max_cpus: int, base: int = EBDA_START) -> bytes:
    """The floating pointer followed by the configuration table, to be written at guest ``base``.

    CPUs 0..max_cpus-1 get processor entries (APIC id = index, CPU 0 the BSP); only the first
    ``nr_cpus`` are marked enabled, the rest are slots Linux counts as hot-pluggable.
    """
    if not 1 <= nr_cpus <= max_cpus:
        raise BootError(f"cannot describe {nr_cpus} vCPUs out of a maximum of {max_cpus}")
    if max_cpus > MAX_CPUS:
        raise BootError(f"the MP table describes at most {MAX_CPUS} vCPUs, not {max_cpus}")
    if base + mptable_size(max_cpus) > BIOS_ROM_START:
        raise BootError(f"an MP table for {max_cpus} vCPUs does not fit below the BIOS ROM area")

    entries = []
    for cpu in range(max_cpus):
        flags = (CPU_ENABLED if cpu < nr_cpus else 0) | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", MP_PROCESSOR, cpu, APIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURES))
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, b"ISA   "))
    ioapic = ioapic_id(max_cpus)
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, ioapic, IOAPIC_VERSION, IOAPIC_ENABLED,
                               IOAPIC_ADDR))
    for irq in range(ISA_IRQS):
        entries.append(struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, MP_IRQ_CONFORMING, ISA_BUS_ID, irq,
                                   ioapic, irq))
    # The 8259 PIC's output reaches the BSP on LINT0 (virtual-wire mode); NMIs arrive on LINT1.
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, MP_IRQ_CONFORMING, ISA_BUS_ID, 0,
                               LINT_ALL_APICS, 0))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, MP_IRQ_CONFORMING, ISA_BUS_ID, 0,
                               LINT_ALL_APICS, 1))
    body = b"".join(entries)

    table_addr = base + FLOATING_SIZE
    length = HEADER_SIZE + len(body)
    header = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", length, SPEC_REV, 0, OEM_ID, PRODUCT_ID,
                         0, 0, len(entries), LAPIC_ADDR, 0, 0, 0)
    table = bytearray(header + body)
    table[7] = _checksum(table)

    # length is in 16-byte paragraphs; feature bytes all 0 = "a configuration table is present".
    floating = bytearray(struct.pack("<4sIBBB5s", b"_MP_", table_addr, 1, SPEC_REV, 0, bytes(5)))
    floating[10] = _checksum(floating)
    return bytes(floating + table)


def write_mptable(mem, nr_cpus: int, max_cpus: int, base: int = EBDA_START) -> int:
    """Write the MP table at ``base``; returns the first byte past it."""
    data = build_mptable(nr_cpus, max_cpus, base)
    mem.write(base, data)
    return base + len(data)
