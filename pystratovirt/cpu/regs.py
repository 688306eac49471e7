"""Initial vCPU state: CPUID, MSRs and LAPIC for every vCPU; 64-bit entry registers for the BSP.

The boot processor (index 0) starts directly in long mode at the kernel's 64-bit entry point,
as the Linux x86 boot protocol ("64-bit boot protocol") wants: paging on with the loader's
identity map, flat __BOOT_CS/__BOOT_DS segments from :mod:`pystratovirt.boot.gdt`, interrupts
off, RSI pointing at boot_params (the zero page).

Application processors (index > 0) get the same CPUID model, MSRs and LAPIC LINT set-up but keep
KVM's reset register state: with the in-kernel irqchip they wait for the guest's INIT/SIPI and
start in real mode at the SIPI vector, so setting their registers would be both pointless and
wrong. :func:`configure_boot_cpu` and :func:`configure_application_processor` make that split
explicit; :func:`configure_vcpu` picks one by index and refuses entry arguments for an AP.

Guest memory is not touched here: the loader writes the GDT, IDT, page tables and zero page at
the :mod:`pystratovirt.memory.layout` addresses these registers point to.
"""

from __future__ import annotations

import typing

from ..boot import gdt
from ..kvm import structs as s
from ..memory import layout
from .cpuid import CpuModel, Topology, find

if typing.TYPE_CHECKING:
    from pystratovirt.kvm.system import Kvm
    from pystratovirt.kvm.vcpu import Vcpu

# Control-register and EFER bits.
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as one; everything else (IF included) clear
FPU_FCW_DEFAULT = 0x37F   # FNINIT value: all x87 exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80    # all SSE exceptions masked, round to nearest

# MSR indices.
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

MISC_ENABLE_FAST_STRING = 1 << 0
# MTRRs enabled (bit 11), default memory type write-back (6). Fixed-range MTRRs stay disabled
# (bit 10 clear): nobody programs them, and enabled-but-zero they would make the first MiB UC.
MTRR_DEF_TYPE_WB_ENABLED = (1 << 11) | 6
LEAF1_EDX_MTRR = 1 << 12

# LAPIC registers (offsets into kvm_lapic_state.regs) and delivery modes.
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_DELIVERY_MODE_MASK = 0x700
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def kvm_segment(seg: gdt.Segment) -> s.kvm_segment:
    return s.kvm_segment(base=seg.base, limit=seg.limit, selector=seg.selector, type=seg.type,
                         present=seg.present, dpl=seg.dpl, db=seg.db, s=seg.s, l=seg.l, g=seg.g,
                         avl=seg.avl, unusable=0)


def boot_msrs(model_entries, supported_msrs: typing.Collection[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """(MSR values to set, MSRs skipped because KVM does not handle them on this host).

    The syscall/sysenter MSRs start at zero (the guest programs them), TSC at zero on every vCPU
    so they agree, fast strings on. MTRRdefType makes all memory write-back for a guest without
    firmware to program MTRRs; KVM emulates it whenever the CPU model has the MTRR bit, even
    though it is not in KVM_GET_MSR_INDEX_LIST.
    """
    wanted = [
        (MSR_IA32_SYSENTER_CS, 0), (MSR_IA32_SYSENTER_ESP, 0), (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0), (MSR_LSTAR, 0), (MSR_CSTAR, 0), (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    leaf1 = find(model_entries, 1)
    mtrr = leaf1 is not None and bool(leaf1.edx & LEAF1_EDX_MTRR)
    supported = set(supported_msrs)
    out, skipped = [], []
    for index, value in wanted:
        if index in supported:
            out.append((index, value))
        else:
            skipped.append(index)
    if mtrr or MSR_MTRR_DEF_TYPE in supported:
        out.append((MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED))
    else:
        skipped.append(MSR_MTRR_DEF_TYPE)
    return out, skipped


def _set_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~APIC_DELIVERY_MODE_MASK) | (mode << 8)


def configure_lint(vcpu: Vcpu) -> None:
    """LINT0 = ExtINT (the PIC's output), LINT1 = NMI, as PC firmware leaves them.

    Only the delivery mode changes; the mask bits stay as KVM's reset set them (LINT0 unmasked on
    the BSP, everything masked on APs), and the guest reprograms both anyway.
    """
    lapic = vcpu.get_lapic()
    lapic.set_reg(APIC_LVT_LINT0, _set_delivery_mode(lapic.get_reg(APIC_LVT_LINT0), APIC_MODE_EXTINT))
    lapic.set_reg(APIC_LVT_LINT1, _set_delivery_mode(lapic.get_reg(APIC_LVT_LINT1), APIC_MODE_NMI))
    vcpu.set_lapic(lapic)


def _configure_common(vcpu: Vcpu, index: int, model: CpuModel, msr_index_list, lapic: bool) -> list[int]:
    entries = model.entries_for(index)
    # CPUID first: KVM checks later CR4/MSR writes against the guest's CPUID.
    vcpu.set_cpuid2(entries)
    msrs, skipped = boot_msrs(entries, msr_index_list)
    vcpu.set_msrs(msrs)
    if lapic:
        configure_lint(vcpu)
    return skipped


def _resolve_model(kvm: Kvm, topology: Topology | None, model: CpuModel | None) -> CpuModel:
    if model is not None:
        return model
    if topology is None:
        raise ValueError("configure a vCPU with either a CpuModel or a Topology")
    return CpuModel.from_kvm(kvm, topology)


def configure_boot_cpu(vcpu: Vcpu, *, kvm: Kvm, entry_rip: int, boot_params_addr: int,
                       topology: Topology | None = None, model: CpuModel | None = None,
                       msr_index_list: typing.Collection[int] | None = None,
                       lapic: bool = True) -> list[int]:
    """Set up vCPU 0 to enter a 64-bit kernel at ``entry_rip``; returns the MSRs skipped.

    ``lapic`` needs the in-kernel irqchip (KVM_GET_LAPIC fails without one).
    """
    model = _resolve_model(kvm, topology, model)
    msr_index_list = kvm.get_msr_index_list() if msr_index_list is None else msr_index_list
    skipped = _configure_common(vcpu, 0, model, msr_index_list, lapic)

    sregs = vcpu.get_sregs()  # keeps KVM's apic_base and pending-interrupt bitmap
    sregs.cs = kvm_segment(gdt.segment(gdt.CODE_SELECTOR))
    data = kvm_segment(gdt.segment(gdt.DATA_SELECTOR))
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = kvm_segment(gdt.segment(gdt.TSS_SELECTOR))
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(gdt.GDT_TABLE) * 8 - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 7  # one empty gate: any exception before Linux loads its IDT triple-faults
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG  # caches on (no CD/NW), WP left to the kernel
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA  # the kernel turns on SCE/NX itself
    vcpu.set_sregs(sregs)

    regs = s.kvm_regs()
    regs.rflags = RFLAGS_RESERVED
    regs.rip = entry_rip
    regs.rsp = regs.rbp = layout.BOOT_STACK_TOP
    regs.rsi = boot_params_addr
    vcpu.set_regs(regs)

    fpu = s.kvm_fpu()
    fpu.fcw = FPU_FCW_DEFAULT
    # KVM_SET_FPU ignores mxcsr (KVM copies every other fxsave field); the guest's FPU state
    # starts with MXCSR = 0x1f80 anyway. Set it so the struct says what we mean.
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)
    return skipped


def configure_application_processor(vcpu: Vcpu, index: int, *, kvm: Kvm,
                                    topology: Topology | None = None,
                                    model: CpuModel | None = None,
                                    msr_index_list: typing.Collection[int] | None = None,
                                    lapic: bool = True) -> list[int]:
    """CPUID, MSRs and LINTs for AP ``index`` (> 0); its registers keep their reset state."""
    if index <= 0:
        raise ValueError(f"vCPU {index} is the boot processor; use configure_boot_cpu")
    model = _resolve_model(kvm, topology, model)
    msr_index_list = kvm.get_msr_index_list() if msr_index_list is None else msr_index_list
    return _configure_common(vcpu, index, model, msr_index_list, lapic)


def configure_vcpu(vcpu: Vcpu, index: int, *, kvm: Kvm, entry_rip: int | None = None,
                   boot_params_addr: int | None = None, topology: Topology | None = None,
                   model: CpuModel | None = None,
                   msr_index_list: typing.Collection[int] | None = None,
                   lapic: bool = True) -> list[int]:
    """Configure vCPU ``index``: the BSP needs ``entry_rip`` and ``boot_params_addr``; an AP
    must not be given them (it is started by the guest). Returns the MSRs skipped on this host.
    """
    if index == 0:
        if entry_rip is None or boot_params_addr is None:
            raise ValueError("the boot vCPU needs entry_rip and boot_params_addr")
        return configure_boot_cpu(vcpu, kvm=kvm, entry_rip=entry_rip,
                                  boot_params_addr=boot_params_addr, topology=topology,
                                  model=model, msr_index_list=msr_index_list, lapic=lapic)
    if entry_rip is not None or boot_params_addr is not None:
        raise ValueError(f"vCPU {index} is an application processor: the guest starts it with "
                         f"INIT/SIPI, so it takes no entry_rip or boot_params_addr")
    return configure_application_processor(vcpu, index, kvm=kvm, topology=topology, model=model,
                                           msr_index_list=msr_index_list, lapic=lapic)
