"""ctypes mirrors of the <linux/kvm.h> / <asm/kvm.h> (x86_64) structures this VMM passes to KVM.

Each Structure lists the kernel's fields in the kernel's order with the kernel's types, and relies
on ctypes' native alignment rules (identical to the C compiler's on x86_64); the tests compare
every size and the interesting offsets against a C program built from the real headers.

Flexible-array structures (kvm_msrs, kvm_cpuid2, kvm_msr_list, kvm_xsave) are built per call by
the ``*_with`` factories below, since ctypes arrays have a fixed length. Flag constants live next to
the structure they belong to. :class:`CpuidEntry` is the plain-Python form of one CPUID entry
that the CPU model (``pystratovirt.cpu``) works with.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass, replace

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32


# -- memory --------------------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


# -- registers -----------------------------------------------------------------------------------
class kvm_regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u16),
        ("padding", u16 * 3),
    ]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
        ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
        ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),  # abridged tag word, fxsave format
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


# -- MSRs ----------------------------------------------------------------------------------------
class kvm_msr_entry(ctypes.Structure):
    _fields_ = [
        ("index", u32),
        ("reserved", u32),
        ("data", u64),
    ]


class kvm_msrs(ctypes.Structure):
    """The fixed header of struct kvm_msrs; use :func:`kvm_msrs_with` for one with entries."""

    _fields_ = [
        ("nmsrs", u32),
        ("pad", u32),
    ]


def kvm_msrs_with(count: int) -> ctypes.Structure:
    """A zeroed struct kvm_msrs with room for ``count`` entries (nmsrs already set)."""

    class _KvmMsrs(ctypes.Structure):
        _fields_ = kvm_msrs._fields_ + [("entries", kvm_msr_entry * count)]

    msrs = _KvmMsrs()
    msrs.nmsrs = count
    return msrs


class kvm_msr_list(ctypes.Structure):
    """The fixed header of struct kvm_msr_list; use :func:`kvm_msr_list_with`."""

    _fields_ = [("nmsrs", u32)]


def kvm_msr_list_with(count: int) -> ctypes.Structure:
    class _KvmMsrList(ctypes.Structure):
        _fields_ = kvm_msr_list._fields_ + [("indices", u32 * count)]

    lst = _KvmMsrList()
    lst.nmsrs = count
    return lst


# -- CPUID ---------------------------------------------------------------------------------------
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic) the header's spelling
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
KVM_CPUID_FLAG_STATEFUL_FUNC = 1 << 1
KVM_CPUID_FLAG_STATE_READ_NEXT = 1 << 2


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """The fixed header of struct kvm_cpuid2; use :func:`kvm_cpuid2_with` for one with entries."""

    _fields_ = [
        ("nent", u32),
        ("padding", u32),
    ]


def kvm_cpuid2_with(count: int) -> ctypes.Structure:
    class _KvmCpuid2(ctypes.Structure):
        _fields_ = kvm_cpuid2._fields_ + [("entries", kvm_cpuid_entry2 * count)]

    cpuid = _KvmCpuid2()
    cpuid.nent = count
    return cpuid


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/sub-leaf as KVM reports or accepts it."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def with_regs(self, **regs: int) -> CpuidEntry:
        return replace(self, **regs)

    def to_c(self) -> kvm_cpuid_entry2:
        return kvm_cpuid_entry2(self.function, self.index, self.flags,
                                self.eax & 0xFFFF_FFFF, self.ebx & 0xFFFF_FFFF,
                                self.ecx & 0xFFFF_FFFF, self.edx & 0xFFFF_FFFF)

    @classmethod
    def from_c(cls, e: kvm_cpuid_entry2) -> CpuidEntry:
        return cls(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)


def cpuid2_from_entries(entries: Iterable[CpuidEntry]) -> ctypes.Structure:
    listed = list(entries)
    cpuid = kvm_cpuid2_with(len(listed))
    for i, entry in enumerate(listed):
        cpuid.entries[i] = entry.to_c()
    return cpuid


def entries_from_cpuid2(cpuid: ctypes.Structure) -> list[CpuidEntry]:
    return [CpuidEntry.from_c(cpuid.entries[i]) for i in range(cpuid.nent)]


# -- XSAVE, XCRs, debug registers ----------------------------------------------------------------
KVM_XSAVE_SIZE = 4096  # the fixed part of struct kvm_xsave; KVM_CAP_XSAVE2 may ask for more


class kvm_xsave(ctypes.Structure):
    """The XSAVE area as KVM_GET_XSAVE/KVM_SET_XSAVE exchange it (legacy FXSAVE layout first).

    The header's struct ends in a flexible ``extra`` array: KVM_GET_XSAVE2 and KVM_SET_XSAVE move
    as many bytes as KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says on the VM fd (at least 4096, more
    once a process enables a dynamic feature such as AMX). Use :func:`kvm_xsave_with` for those.
    """

    _fields_ = [("region", u32 * (KVM_XSAVE_SIZE // 4))]


def kvm_xsave_with(size: int) -> ctypes.Structure:
    """A zeroed struct kvm_xsave of ``size`` bytes (a multiple of 4, at least 4096)."""
    if size < KVM_XSAVE_SIZE or size % 4:
        raise ValueError(f"an XSAVE area of {size} bytes is not a multiple of 4 of at least "
                         f"{KVM_XSAVE_SIZE}")

    class _KvmXsave(ctypes.Structure):
        _fields_ = [*kvm_xsave._fields_, ("extra", u32 * ((size - KVM_XSAVE_SIZE) // 4))]

    return _KvmXsave()


XSAVE_MXCSR_INDEX = 24 // 4  # MXCSR sits at byte 24 of the legacy region

KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [
        ("xcr", u32),
        ("reserved", u32),
        ("value", u64),
    ]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


# -- local APIC ----------------------------------------------------------------------------------
KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]

    def get_reg(self, offset: int) -> int:
        return int.from_bytes(bytes(self.regs[offset:offset + 4]), "little")

    def set_reg(self, offset: int, value: int) -> None:
        self.regs[offset:offset + 4] = list((value & 0xFFFF_FFFF).to_bytes(4, "little"))


# -- interrupt controllers, timers, eventfds -----------------------------------------------------
KVM_PIT_SPEAKER_DUMMY = 1


class kvm_pit_config(ctypes.Structure):
    _fields_ = [
        ("flags", u32),
        ("pad", u32 * 15),
    ]


KVM_PIT_FLAGS_HPET_LEGACY = 1 << 0
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 1 << 1


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", u32),  # can be 65536
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", ctypes.c_int64),  # host ktime (ns) when count was loaded
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", u32),
        ("reserved", u32 * 9),
    ]


# KVM_GET_IRQCHIP / KVM_SET_IRQCHIP: which chip a struct kvm_irqchip holds.
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_pic_state(ctypes.Structure):
    """One i8259 as KVM models it."""

    _fields_ = [(name, u8) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


KVM_IOAPIC_NUM_PINS = 24
# Bits of one 64-bit IOAPIC redirection entry (the header's bit-field view of the same union).
IOAPIC_REDIR_MASKED = 1 << 16
IOAPIC_REDIR_LEVEL = 1 << 15
IOAPIC_REDIR_DEST_SHIFT = 56


class kvm_ioapic_state(ctypes.Structure):
    """The IOAPIC; ``redirtbl`` holds each pin's 64-bit redirection entry as one integer."""

    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class _irqchip_union(ctypes.Union):
    _fields_ = [
        ("dummy", ctypes.c_char * 512),  # fixes the union's size
        ("pic", kvm_pic_state),
        ("ioapic", kvm_ioapic_state),
    ]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [
        ("chip_id", u32),
        ("pad", u32),
        ("chip", _irqchip_union),
    ]


# KVM_GET_CLOCK / KVM_SET_CLOCK (KVM_CAP_ADJUST_CLOCK says which flags this host fills in).
KVM_CLOCK_TSC_STABLE = 1 << 1
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),      # kvmclock, ns
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),   # host CLOCK_REALTIME at the same instant (KVM_CLOCK_REALTIME)
        ("host_tsc", u64),   # host TSC at the same instant (KVM_CLOCK_HOST_TSC)
        ("pad", u32 * 4),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class _irq_or_status(ctypes.Union):
    _fields_ = [("irq", u32), ("status", s32)]


class kvm_irq_level(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("_u", _irq_or_status),
        ("level", u32),
    ]


# -- vCPU state ----------------------------------------------------------------------------------
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class _vcpu_events_exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _vcpu_events_exception),
        ("interrupt", _vcpu_events_interrupt),
        ("nmi", _vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _vcpu_events_smi),
        ("triple_fault", _vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", u64),   # in
        ("physical_address", u64),  # out
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", u32),
        ("flags", u32),
        ("args", u64 * 4),
        ("pad", u8 * 64),
    ]


# -- struct kvm_run --------------------------------------------------------------------------------
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0
KVM_PIO_PAGE_OFFSET = 1
SYNC_REGS_SIZE_BYTES = 2048


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _run_io(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),     # bytes per element
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),  # from the start of the kvm_run mapping
    ]


class _run_debug(ctypes.Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _run_mmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", u64),
        ("data", u8 * 8),
        ("len", u32),
        ("is_write", u8),
    ]


class _run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_emulation_failure(ctypes.Structure):
    # The header wraps insn_size/insn_bytes in an anonymous union of an anonymous struct; the
    # layout is the same as listing them directly.
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _system_event_payload(ctypes.Union):
    _fields_ = [("flags", u64), ("data", u64 * 16)]


class _run_system_event(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [("type", u32), ("ndata", u32), ("_u", _system_event_payload)]


class _run_exit_union(ctypes.Union):
    _fields_ = [
        ("hw", _run_hw),
        ("fail_entry", _run_fail_entry),
        ("ex", _run_ex),
        ("io", _run_io),
        ("debug", _run_debug),
        ("mmio", _run_mmio),
        ("internal", _run_internal),
        ("emulation_failure", _run_emulation_failure),
        ("system_event", _run_system_event),
        ("padding", ctypes.c_char * 256),  # fixes the union's size
    ]


class kvm_run(ctypes.Structure):
    """The shared page returned by mmap(vcpu_fd); only the fields this VMM uses are named."""

    _anonymous_ = ("_exit",)
    _fields_ = [
        # in
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        # out
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        # in (pre_kvm_run), out (post_kvm_run)
        ("cr8", u64),
        ("apic_base", u64),
        ("_exit", _run_exit_union),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES),
    ]
