"""Test helpers: a tiny real-mode VM for the kvm-layer tests (one 64 KiB slot, vCPU 0 at 0:CODE).

Guest code is hand-assembled 16-bit x86; the tests give it as hex with the instructions in
comments next to it.
"""

from __future__ import annotations

import ctypes
import mmap

RAM_SIZE = 0x10000   # 64 KiB at guest physical 0
CODE = 0x1000


class RealModeGuest:
    """A VM with one 64 KiB slot and vCPU 0 in real mode at CS:IP = 0:CODE."""

    def __init__(self, kvm, code: bytes, irqchip: bool = False, pit: bool = False):
        self.vm = kvm.create_vm()
        self.ram = mmap.mmap(-1, RAM_SIZE)
        self._anchor = ctypes.c_char.from_buffer(self.ram)
        self.vm.set_user_memory_region(0, 0, RAM_SIZE, ctypes.addressof(self._anchor))
        if irqchip:
            self.vm.set_tss_addr(0xFFFB_D000)
            self.vm.create_irqchip()
        if pit:
            self.vm.create_pit2(speaker_dummy=True)
        self.ram[CODE:CODE + len(code)] = code
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip = CODE
        regs.rflags = 2
        self.vcpu.set_regs(regs)

    def close(self):
        self.vcpu.close()
        self.vm.close()
        del self._anchor
        self.ram.close()

