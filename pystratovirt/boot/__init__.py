"""boot layer: loads a Linux kernel (bzImage, ELF vmlinux or raw vmlinux.bin), its initrd and the boot
structures (zero page, e820, command line, GDT/IDT, identity page tables, MP table) into guest RAM.

The machine calls :func:`load_kernel` and starts the BSP in 64-bit mode at ``BootInfo.entry`` with
RSI = ``BootInfo.boot_params``.
"""

from .acpi import write_acpi_tables
from .errors import BootError
from .loader import BootInfo, load_kernel

__all__ = ["BootError", "BootInfo", "load_kernel", "write_acpi_tables"]
