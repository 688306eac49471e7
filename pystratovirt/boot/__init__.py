"""boot layer: loads a Linux kernel (bzImage, ELF vmlinux or raw vmlinux.bin), its initrd and the boot
structures (zero page, e820, command line, GDT/IDT, identity page tables, MP table) into guest RAM.

The machine calls :func:`prepare_kernel` when it builds the VM, :meth:`KernelLoad.finish` before
the guest first runs, and starts the BSP in 64-bit mode at ``BootInfo.entry`` with
RSI = ``BootInfo.boot_params``; :func:`load_kernel` is both steps at once.
"""

from .acpi import write_acpi_tables
from .errors import BootError
from .loader import BootInfo, KernelLoad, load_kernel, prepare_kernel

__all__ = ["BootError", "BootInfo", "KernelLoad", "load_kernel", "prepare_kernel", "write_acpi_tables"]
