"""Behaviour of the ctypes mirrors beyond their layout: flexible arrays, helpers, CpuidEntry."""

import ctypes

from pystratovirt.kvm import structs as s


def test_flexible_array_factories_size_and_count():
    msrs = s.kvm_msrs_with(3)
    assert msrs.nmsrs == 3
    assert ctypes.sizeof(msrs) == ctypes.sizeof(s.kvm_msrs) + 3 * ctypes.sizeof(s.kvm_msr_entry)
    cpuid = s.kvm_cpuid2_with(5)
    assert cpuid.nent == 5
    assert ctypes.sizeof(cpuid) == 8 + 5 * 40
    lst = s.kvm_msr_list_with(2)
    assert lst.nmsrs == 2 and ctypes.sizeof(lst) == 4 + 2 * 4
    assert s.kvm_msrs_with(0).nmsrs == 0


def test_cpuid_entry_round_trip_through_kvm_cpuid2():
    entries = [s.CpuidEntry(1, 0, 0, 0x11, 0x22, 0x33, 0x44),
               s.CpuidEntry(4, 2, s.KVM_CPUID_FLAG_SIGNIFICANT_INDEX, 1, 2, 3, 4)]
    buf = s.cpuid2_from_entries(entries)
    assert buf.nent == 2
    assert s.entries_from_cpuid2(buf) == entries
    assert entries[0].with_regs(ecx=7).ecx == 7 and entries[0].ecx == 0x33


def test_lapic_register_accessors_are_little_endian_32_bit():
    lapic = s.kvm_lapic_state()
    lapic.set_reg(0x350, 0x0001_0700)
    assert bytes(lapic.regs[0x350:0x354]) == b"\x00\x07\x01\x00"
    assert lapic.get_reg(0x350) == 0x10700
    assert lapic.get_reg(0x360) == 0


def test_irq_level_union_aliases_irq_and_status():
    lvl = s.kvm_irq_level(level=1)
    lvl.irq = 5
    assert lvl.status == 5 and lvl.level == 1


def test_kvm_run_exit_union_overlays():
    run = s.kvm_run()
    run.internal.suberror = 1
    run.internal.ndata = 3
    run.emulation_failure.flags = 1
    run.emulation_failure.insn_size = 2
    assert run.internal.data[0] == 1
    assert run.emulation_failure.suberror == 1
    run.system_event.data[0] = 0x55
    assert run.system_event.flags == 0x55
