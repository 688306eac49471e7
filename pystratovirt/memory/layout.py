"""The x86_64 guest physical address map of the micro-VM (StratoVirt v0.2+ layout).

Everything that places something in guest physical memory takes its address from here, so the
loader, the devices and the machine agree on one map.
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PAGE_SIZE = 4096

# RAM below 4 GiB stops at the 32-bit hole; RAM past it continues at 4 GiB.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
HIGH_RAM_START = MMIO_HOLE_END

# Fixed low-memory boot structures (StratoVirt's x86_64 boot_loader).
GDT_ADDR = 0x500
IDT_ADDR = 0x530  # after the 5-entry GDT (0x500..0x527)
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000            # 4 page directories: 0xB000..0xEFFF identity-map 4 GiB with 2 MiB pages
PD_COUNT = 4
CMDLINE_ADDR = 0x2_0000
CMDLINE_MAX = 0x1_0000 - 1  # the command line may use up to 64 KiB - 1 bytes
EBDA_START = 0x9_FC00        # MP table lives here
EBDA_END = 0xA_0000
BIOS_ROM_START = 0xF_0000
HIGH_MEMORY_START = 0x10_0000
VMLINUX_LOAD_ADDR = 0x100_0000  # raw vmlinux.bin and the probe guest: loaded and entered here
INITRD_ADDR_MAX = 0x37FF_FFFF

# KVM-internal areas placed inside the 32-bit hole, out of RAM's way.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

# Devices.
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
VIRTIO_MMIO_BASE = 0xF010_0000
VIRTIO_MMIO_SIZE = 0x200
VIRTIO_IRQ_FIRST = 5
VIRTIO_IRQ_LAST = 15
# ACPI hardware-reduced sleep registers (FADT SLEEP_CONTROL_REG / SLEEP_STATUS_REG), one byte each.
ACPI_SLEEP_CONTROL_PORT = 0x600
ACPI_SLEEP_STATUS_PORT = 0x601

MEM_SIZE_MIN = 128 * MiB
MEM_SIZE_MAX = 512 * GiB


def ram_ranges(size: int) -> list[tuple[int, int]]:
    """Guest physical (start, length) of each RAM range for a VM with ``size`` bytes of RAM."""
    low = min(size, MMIO_HOLE_START)
    ranges = [(0, low)]
    if size > low:
        ranges.append((HIGH_RAM_START, size - low))
    return ranges
