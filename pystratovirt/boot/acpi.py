"""The ACPI tables that describe the micro-VM to a guest: RSDP, XSDT, FADT, MADT and DSDT.

A distro kernel built without CONFIG_X86_MPPARSE ignores the MP table, so this is how it learns
the vCPUs and the IOAPIC, how it finds the serial port and the virtio-mmio devices (the
virtio_mmio driver binds to ``LNRO0005`` ACPI devices), and how it powers the VM off.

Where: the RSDP sits at the start of the BIOS ROM area (layout.BIOS_ROM_START, 0xF0000), where
Linux's legacy scan of 0xE0000..0xFFFFF finds it, and the other tables follow it inside that
64 KiB area, which the e820 map already reports as reserved: 3692 bytes for 254 vCPUs and 16
virtio devices, so the area is never close to full.

What the tables say (ACPI 6.3: FADT 6.3, MADT revision 5):

* FADT: hardware-reduced ACPI (no PM1/GPE blocks, no SCI, no FACS). Power-off goes through the
  SLEEP_CONTROL/SLEEP_STATUS registers, one byte each at layout.ACPI_SLEEP_CONTROL_PORT and
  layout.ACPI_SLEEP_STATUS_PORT (devices.acpi_pm answers them); reset through RESET_REG, which
  is the i8042 command port with value 0xFE, the same line ``reboot=k`` pulses. IAPC_BOOT_ARCH
  says: no legacy (non-ACPI-enumerated) devices, no 8042 to probe, no VGA, no CMOS RTC.
* MADT: one Processor Local APIC per vCPU slot (APIC id = ACPI UID = index; enabled below
  nr_cpus, online-capable above), one IOAPIC, LINT1 = NMI on every processor.
* DSDT: ``\\_S5_`` and, under ``\\_SB``, the serial ports (PNP0501) and the virtio-mmio devices.

Linux on a hardware-reduced platform uses no 8259 PIC and no PIT (``acpi_generic_reduced_hw_init``)
and numbers no legacy IRQs, so every interrupt a device uses must come from the DSDT: that is
why the serial port is there although the brief for this module only asked for virtio devices.

Everything is built and checked as bytes first; :func:`write_acpi_tables` writes them last.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..devices.i8042 import I8042_COMMAND_PORT, I8042_RESET_COMMAND
from ..memory.layout import (
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT,
    BIOS_ROM_START,
    HIGH_MEMORY_START,
    IOAPIC_ADDR,
    LAPIC_ADDR,
)
from . import aml
from .errors import BootError
from .mptable import ioapic_id

RSDP_ADDR = BIOS_ROM_START       # 16-byte aligned, inside the legacy scan window
ACPI_AREA_END = HIGH_MEMORY_START
TABLE_ALIGN = 16

MAX_CPUS = 254                   # xAPIC ids 0..253 (0xFF is the broadcast id)

OEM_ID = b"PYSTRT"
OEM_TABLE_ID = b"PYSTRATO"
OEM_REVISION = 1
CREATOR_ID = b"PYSV"
CREATOR_REVISION = 1
HEADER_SIZE = 36

# Revisions: ACPI 6.3 is the first spec with the MADT "online capable" flag, and Linux only
# honours that flag when the FADT says 6.3 or newer (major 6, minor >= 3).
RSDP_REVISION = 2
XSDT_REVISION = 1
FADT_REVISION = 6
FADT_MINOR_REVISION = 3
FADT_SIZE = 276
MADT_REVISION = 5
DSDT_REVISION = 2                # 2: integers are 64-bit

RSDP_SIZE = 36
RSDP_CHECKSUM_LEN = 20           # the ACPI 1.0 part covered by the first checksum

# Generic Address Structure
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# FADT Flags
FADT_PWR_BUTTON = 1 << 4         # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5         # set: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HEADLESS = 1 << 12
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_FLAGS = (FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HEADLESS
              | FADT_HW_REDUCED_ACPI)

# FADT IAPC_BOOT_ARCH. Left clear on purpose: LEGACY_DEVICES (everything the guest may use is in
# the DSDT, so Linux skips the PnP BIOS) and 8042 (Linux then does not probe the keyboard
# controller, which is emulated only for its reset line; reboot=k writes port 0x64 regardless).
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
IAPC_BOOT_ARCH = IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT

# SCI_INT stays 0: a hardware-reduced platform has no SCI (Linux ignores the field then), and a
# made-up IRQ 9 would claim, for other readers of the table, a line the virtio devices use.
SCI_INT = 0

# MADT
MADT_PCAT_COMPAT = 1 << 0        # KVM's in-kernel irqchip includes the dual 8259
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_LOCAL_APIC_NMI = 4
LAPIC_ENABLED = 1 << 0
LAPIC_ONLINE_CAPABLE = 1 << 1
ALL_PROCESSORS_UID = 0xFF
MPS_INTI_CONFORMING = 0          # polarity and trigger as the bus says
NMI_LINT = 1
LOCAL_APIC_ENTRY_SIZE = 8
IO_APIC_ENTRY_SIZE = 12
LOCAL_APIC_NMI_ENTRY_SIZE = 6
# No Interrupt Source Override: the VMM keeps KVM's default GSI routing (GSI n -> IOAPIC pin n
# and, below 16, 8259 pin n), and KVM's PIT raises GSI 0, so ISA IRQ 0 is IOAPIC pin 0 just as
# the MP table says. The "IRQ0 -> GSI 2" override of PC firmware (and QEMU, which reroutes GSI 0
# to pin 2 with KVM_SET_GSI_ROUTING) would be wrong here.

# Sleep registers (hardware-reduced ACPI, section 4.8.3.7/4.8.3.8)
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
WAK_STS = 1 << 7
SLP_TYP_S5 = 5                   # the \_S5_ value; devices.acpi_pm powers off on it

VIRTIO_MMIO_HID = "LNRO0005"
SERIAL_HID = "PNP0501"
SERIAL_PORT_LEN = 8
MAX_DEVICES = 256                # names VR00..VRFF / COM1..COM9 stay 4 characters


@dataclass(frozen=True)
class AcpiTables:
    """The tables as one blob to write at ``base``; ``tables`` maps signature -> (address, length)."""

    base: int
    blob: bytes
    tables: dict[str, tuple[int, int]]

    @property
    def rsdp(self) -> int:
        return self.base

    @property
    def end(self) -> int:
        return self.base + len(self.blob)


# -- helpers ------------------------------------------------------------------------------------------
def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` plus itself sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _header(signature: bytes, length: int, revision: int) -> bytes:
    return struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                       OEM_REVISION, CREATOR_ID, CREATOR_REVISION)


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header (with length and checksum filled in) followed by ``body``."""
    table = bytearray(_header(signature, HEADER_SIZE + len(body), revision) + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(address: int, *, space: int = GAS_SYSTEM_IO, bit_width: int = 8, bit_offset: int = 0,
        access_size: int = GAS_ACCESS_BYTE) -> bytes:
    """A 12-byte Generic Address Structure."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access_size, address)


def _align(value: int) -> int:
    return (value + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)


# -- the tables ---------------------------------------------------------------------------------------
def build_rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2: no RSDT (RsdtAddress 0); the XSDT is the root table."""
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0,
                                 RSDP_SIZE, xsdt_addr, 0))
    rsdp[8] = checksum(rsdp[:RSDP_CHECKSUM_LEN])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_xsdt(entries: Sequence[int]) -> bytes:
    return _table(b"XSDT", XSDT_REVISION, struct.pack(f"<{len(entries)}Q", *entries))


def build_fadt(dsdt_addr: int, *, sleep_ports: tuple[int, int],
               reset: tuple[int, int] = (I8042_COMMAND_PORT, I8042_RESET_COMMAND)) -> bytes:
    """FADT revision 6.3 for a hardware-reduced platform (276 bytes)."""
    control_port, status_port = sleep_ports
    reset_port, reset_value = reset
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(36, "<I", 0)                         # FIRMWARE_CTRL: no FACS (optional when HW-reduced)
    put(40, "<I", dsdt_addr)                 # DSDT (tables live below 1 MiB, so both fit)
    put(45, "<B", 0)                         # Preferred_PM_Profile: unspecified
    put(46, "<H", SCI_INT)
    put(109, "<H", IAPC_BOOT_ARCH)
    put(112, "<I", FADT_FLAGS)
    body[116 - HEADER_SIZE:128 - HEADER_SIZE] = gas(reset_port)
    put(128, "<B", reset_value)
    put(131, "<B", FADT_MINOR_REVISION)
    put(140, "<Q", dsdt_addr)                # X_DSDT
    body[244 - HEADER_SIZE:256 - HEADER_SIZE] = gas(control_port)   # SLEEP_CONTROL_REG
    body[256 - HEADER_SIZE:268 - HEADER_SIZE] = gas(status_port)    # SLEEP_STATUS_REG
    put(268, "<8s", OEM_TABLE_ID)            # Hypervisor Vendor Identity
    return _table(b"FACP", FADT_REVISION, bytes(body))


def build_madt(nr_cpus: int, max_cpus: int) -> bytes:
    entries = []
    for cpu in range(max_cpus):
        flags = LAPIC_ENABLED if cpu < nr_cpus else LAPIC_ONLINE_CAPABLE
        entries.append(struct.pack("<BBBBI", MADT_LOCAL_APIC, LOCAL_APIC_ENTRY_SIZE, cpu, cpu, flags))
    entries.append(struct.pack("<BBBBII", MADT_IO_APIC, IO_APIC_ENTRY_SIZE, ioapic_id(max_cpus), 0,
                               IOAPIC_ADDR, 0))
    # LINT1 carries NMIs on every processor (KVM delivers KVM_NMI through LVT1's NMI mode).
    entries.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, LOCAL_APIC_NMI_ENTRY_SIZE,
                               ALL_PROCESSORS_UID, MPS_INTI_CONFORMING, NMI_LINT))
    body = struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT) + b"".join(entries)
    return _table(b"APIC", MADT_REVISION, body)


def _interrupt(gsi: int) -> bytes:
    # Edge, active high, exclusive: ISA-style lines that only this device drives.
    return aml.extended_interrupt([gsi], edge=True, active_low=False, shared=False)


def build_dsdt(*, virtio_devices: Sequence[tuple[int, int, int]] = (),
               serial_ports: Sequence[tuple[int, int]] = ()) -> bytes:
    """The DSDT's AML: ``\\_S5_``, then ``\\_SB.COMn`` and ``\\_SB.VRnn`` devices.

    ``virtio_devices``: (MMIO base, size, GSI) per device, _UID = its position in the sequence.
    ``serial_ports``: (I/O base, GSI) per 16550 UART, COM1 first.
    """
    if len(virtio_devices) > MAX_DEVICES or len(serial_ports) > 9:
        raise BootError(f"the DSDT describes at most {MAX_DEVICES} virtio devices and 9 serial ports")
    # Package (4) { SLP_TYPa, SLP_TYPb, reserved, reserved }; hardware-reduced OSPM uses only the
    # first value. S5 is the only sleep state offered: no \_S1_ .. \_S4_.
    terms = [aml.name("\\_S5_", aml.package([SLP_TYP_S5, SLP_TYP_S5, 0, 0]))]
    devices = []
    for n, (base, gsi) in enumerate(serial_ports):
        devices.append(aml.device(f"COM{n + 1}", [
            aml.name("_HID", aml.integer(aml.eisa_id(SERIAL_HID))),
            aml.name("_UID", n + 1),
            aml.name("_CRS", aml.resource_template([aml.io_port(base, SERIAL_PORT_LEN),
                                                    _interrupt(gsi)])),
        ]))
    for n, (base, size, gsi) in enumerate(virtio_devices):
        devices.append(aml.device(f"VR{n:02X}", [
            aml.name("_HID", VIRTIO_MMIO_HID),
            aml.name("_UID", n),
            aml.name("_CCA", 1),             # DMA is cache-coherent
            aml.name("_CRS", aml.resource_template([aml.memory32_fixed(base, size),
                                                    _interrupt(gsi)])),
        ]))
    if devices:
        terms.append(aml.scope("\\_SB", devices))
    return _table(b"DSDT", DSDT_REVISION, b"".join(terms))


def build_acpi_tables(*, nr_cpus: int, max_cpus: int,
                      virtio_devices: Sequence[tuple[int, int, int]] = (),
                      serial_ports: Sequence[tuple[int, int]] = (),
                      sleep_ports: tuple[int, int] = (ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT),
                      base: int = RSDP_ADDR, limit: int = ACPI_AREA_END) -> AcpiTables:
    """All tables laid out from ``base`` (RSDP first), checked to end by ``limit``."""
    if not isinstance(nr_cpus, int) or not isinstance(max_cpus, int) or not 1 <= nr_cpus <= max_cpus:
        raise BootError(f"cannot describe {nr_cpus} vCPUs out of a maximum of {max_cpus}")
    if max_cpus > MAX_CPUS:
        raise BootError(f"the MADT describes at most {MAX_CPUS} vCPUs, not {max_cpus}")
    if base % TABLE_ALIGN:
        raise BootError(f"the RSDP address {base:#x} is not 16-byte aligned")
    for port in sleep_ports:
        if not 0 < port <= 0xFFFF:
            raise BootError(f"sleep register port {port:#x} is not an I/O port")
    for mmio, size, gsi in virtio_devices:
        if size <= 0 or mmio < 0 or mmio + size > 1 << 32 or not 0 <= gsi <= 0xFFFF_FFFF:
            raise BootError(f"virtio-mmio device [{mmio:#x}, +{size:#x}) irq {gsi} cannot be described")

    dsdt = build_dsdt(virtio_devices=virtio_devices, serial_ports=serial_ports)
    madt = build_madt(nr_cpus, max_cpus)
    # Addresses first (the XSDT's size is known: two entries), then the bytes.
    xsdt_addr = _align(base + RSDP_SIZE)
    xsdt_len = HEADER_SIZE + 2 * 8
    fadt_addr = _align(xsdt_addr + xsdt_len)
    madt_addr = _align(fadt_addr + FADT_SIZE)
    dsdt_addr = _align(madt_addr + len(madt))
    end = dsdt_addr + len(dsdt)
    if end > limit:
        raise BootError(f"the ACPI tables ({end - base} bytes) do not fit in "
                        f"[{base:#x}, {limit:#x})")
    fadt = build_fadt(dsdt_addr, sleep_ports=sleep_ports)
    xsdt = build_xsdt([fadt_addr, madt_addr])
    placed = [("RSDP", base, build_rsdp(xsdt_addr)), ("XSDT", xsdt_addr, xsdt),
              ("FACP", fadt_addr, fadt), ("APIC", madt_addr, madt), ("DSDT", dsdt_addr, dsdt)]
    blob = bytearray(end - base)
    tables = {}
    for sig, addr, data in placed:
        blob[addr - base:addr - base + len(data)] = data
        tables[sig] = (addr, len(data))
    return AcpiTables(base=base, blob=bytes(blob), tables=tables)


def write_acpi_tables(mem, *, nr_cpus: int, max_cpus: int,
                      virtio_devices: Sequence[tuple[int, int, int]] = (),
                      serial_ports: Sequence[tuple[int, int]] = (),
                      sleep_ports: tuple[int, int] = (ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT),
                      ) -> int:
    """Build the tables and write them into guest RAM at :data:`RSDP_ADDR`; returns that address."""
    tables = build_acpi_tables(nr_cpus=nr_cpus, max_cpus=max_cpus, virtio_devices=virtio_devices,
                               serial_ports=serial_ports, sleep_ports=sleep_ports)
    if not mem.contains(tables.base, len(tables.blob)):
        raise BootError(f"guest RAM does not cover the ACPI area [{tables.base:#x}, {tables.end:#x})")
    mem.write(tables.base, tables.blob)
    return tables.rsdp
