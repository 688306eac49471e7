"""configure_vcpu on real vCPUs: the boot vCPU enters 64-bit code and runs it; APs keep their
reset registers. Guest code is hand-assembled x86-64 (see the comments)."""

import pytest

from cpu.cpu_guest_helpers import CODE_ADDR, make_vm, run_until_out
from pystratovirt.boot import gdt
from pystratovirt.cpu import CpuModel, Topology, configure_vcpu
from pystratovirt.cpu import regs as r
from pystratovirt.cpu.cpuid import find
from pystratovirt.kvm import IoOut
from pystratovirt.kvm import structs as s
from pystratovirt.kvm.structs import CpuidEntry
from pystratovirt.memory import layout


@pytest.fixture
def lm(kvm):
    vm = make_vm(kvm)
    yield vm
    vm.close()


@pytest.mark.kvm
def test_boot_cpu_state_reads_back(kvm, lm):
    vcpu = lm.vm.create_vcpu(0)
    skipped = configure_vcpu(vcpu, 0, kvm=kvm, topology=Topology.for_cpus(1),
                             entry_rip=CODE_ADDR, boot_params_addr=layout.ZERO_PAGE_ADDR)
    assert isinstance(skipped, list)

    sregs = vcpu.get_sregs()
    assert (sregs.cs.selector, sregs.cs.l, sregs.cs.db, sregs.cs.type, sregs.cs.present) == (0x10, 1, 0, 0xB, 1)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        assert (seg.selector, seg.type, seg.db, seg.base, seg.limit) == (0x18, 3, 1, 0, 0xFFFF_FFFF)
    assert (sregs.tr.selector, sregs.tr.type) == (gdt.TSS_SELECTOR, 0xB)
    assert (sregs.gdt.base, sregs.gdt.limit) == (layout.GDT_ADDR, len(gdt.GDT_TABLE) * 8 - 1)
    assert (sregs.idt.base, sregs.idt.limit) == (layout.IDT_ADDR, 7)
    assert sregs.cr0 & (r.CR0_PE | r.CR0_PG | r.CR0_ET | r.CR0_NE) == r.CR0_PE | r.CR0_PG | r.CR0_ET | r.CR0_NE
    assert not sregs.cr0 & (1 << 30 | 1 << 29)  # caches on: CD and NW clear
    assert sregs.cr3 == layout.PML4_ADDR
    assert sregs.cr4 == r.CR4_PAE | r.CR4_OSFXSR | r.CR4_OSXMMEXCPT
    assert sregs.efer & (r.EFER_LME | r.EFER_LMA) == r.EFER_LME | r.EFER_LMA

    regs = vcpu.get_regs()
    assert (regs.rip, regs.rflags) == (CODE_ADDR, 2)
    assert regs.rsp == regs.rbp == layout.BOOT_STACK_TOP
    assert regs.rsi == layout.ZERO_PAGE_ADDR
    assert vcpu.get_fpu().fcw == 0x37F

    msrs = dict(vcpu.get_msrs([r.MSR_IA32_MISC_ENABLE, r.MSR_LSTAR, r.MSR_STAR,
                               r.MSR_KERNEL_GS_BASE, r.MSR_IA32_SYSENTER_CS]))
    assert msrs[r.MSR_IA32_MISC_ENABLE] & r.MISC_ENABLE_FAST_STRING
    assert msrs[r.MSR_LSTAR] == msrs[r.MSR_STAR] == msrs[r.MSR_KERNEL_GS_BASE] == 0
    if r.MSR_MTRR_DEF_TYPE not in skipped:
        assert vcpu.get_msrs([r.MSR_MTRR_DEF_TYPE]) == [(r.MSR_MTRR_DEF_TYPE, 0x806)]

    lapic = vcpu.get_lapic()
    assert (lapic.get_reg(r.APIC_LVT_LINT0) >> 8) & 7 == r.APIC_MODE_EXTINT
    assert (lapic.get_reg(r.APIC_LVT_LINT1) >> 8) & 7 == r.APIC_MODE_NMI


@pytest.mark.kvm
def test_boot_cpu_runs_64_bit_code(kvm, lm):
    lm.memory.write(CODE_ADDR, bytes.fromhex(
        "48b88877665544332211"  # mov rax, 0x1122334455667788  (needs 64-bit mode)
        "48c1e820"              # shr rax, 32
        "66baf803"              # mov dx, 0x3f8
        "ef"                    # out dx, eax
        "0f20c0"                # mov rax, cr0
        "66baf903"              # mov dx, 0x3f9
        "ef"                    # out dx, eax
        "ebfe"))                # jmp $
    vcpu = lm.vm.create_vcpu(0)
    configure_vcpu(vcpu, 0, kvm=kvm, topology=Topology.for_cpus(1), entry_rip=CODE_ADDR,
                   boot_params_addr=layout.ZERO_PAGE_ADDR)
    ex = run_until_out(vcpu, 0x3F8)[-1]
    assert ex.size == 4 and ex.data == (0x11223344).to_bytes(4, "little")
    ex = run_until_out(vcpu, 0x3F9)[-1]
    cr0 = int.from_bytes(ex.data, "little")
    assert cr0 & (r.CR0_PE | r.CR0_PG) == r.CR0_PE | r.CR0_PG


@pytest.mark.kvm
def test_guest_cpuid_instruction_sees_the_model(kvm):
    """vCPU index 2 executes CPUID leaves 1 and 0xB; no irqchip so it can run without SIPI."""
    lm = make_vm(kvm, irqchip=False)
    try:
        lm.memory.write(CODE_ADDR, bytes.fromhex(
            "b801000000"   # mov eax, 1
            "0fa2"         # cpuid
            "89de" "89cf"  # mov esi, ebx ; mov edi, ecx
            "66baf803"     # mov dx, 0x3f8
            "89f0ef"       # mov eax, esi ; out dx, eax
            "89f8ef"       # mov eax, edi ; out dx, eax
            "b80b000000"   # mov eax, 0xb
            "b901000000"   # mov ecx, 1
            "0fa2"         # cpuid
            "89c6" "89df" "89d5"  # mov esi, eax ; mov edi, ebx ; mov ebp, edx
            "66baf803"     # mov dx, 0x3f8
            "89f0ef"       # out eax (shift)
            "89f8ef"       # out ebx (count)
            "89e8ef"       # mov eax, ebp ; out edx (x2APIC id)
            "ebfe"))       # jmp $
        topo = Topology.for_cpus(4)
        model = CpuModel.from_kvm(kvm, topo)
        vcpu = lm.vm.create_vcpu(2)
        r.configure_boot_cpu(vcpu, kvm=kvm, model=model, entry_rip=CODE_ADDR,
                             boot_params_addr=layout.ZERO_PAGE_ADDR, lapic=False)
        vcpu.set_cpuid2(model.entries_for(2))  # this test's vCPU plays index 2
        values = []
        while len(values) < 5:
            ex = vcpu.run()
            assert isinstance(ex, IoOut), ex
            values.append(int.from_bytes(ex.data, "little"))
        ebx1, ecx1, shift, count, x2apic = values
        assert ebx1 >> 24 == 2 and (ebx1 >> 16) & 0xFF == 4
        assert ecx1 & (1 << 31) and not ecx1 & (1 << 13)
        assert (shift, count, x2apic) == (2, 4, 2)
    finally:
        lm.close()


@pytest.mark.kvm
def test_application_processor_keeps_reset_state(kvm, lm):
    bsp = lm.vm.create_vcpu(0)
    ap = lm.vm.create_vcpu(1)
    topo = Topology.for_cpus(2)
    model = CpuModel.from_kvm(kvm, topo)
    before_regs, before_sregs = ap.get_regs(), ap.get_sregs()
    configure_vcpu(bsp, 0, kvm=kvm, model=model, entry_rip=CODE_ADDR,
                   boot_params_addr=layout.ZERO_PAGE_ADDR)
    configure_vcpu(ap, 1, kvm=kvm, model=model)
    regs, sregs = ap.get_regs(), ap.get_sregs()
    assert bytes(regs) == bytes(before_regs)
    assert (regs.rip, sregs.cs.base, sregs.cs.selector) == (0xFFF0, 0xFFFF_0000, 0xF000)
    assert sregs.cr0 == before_sregs.cr0 and not sregs.cr0 & r.CR0_PE
    assert ap.get_mp_state() == s.KVM_MP_STATE_UNINITIALIZED  # waits for INIT/SIPI
    assert find(ap.get_cpuid2(), 1).ebx >> 24 == 1
    assert dict(ap.get_msrs([r.MSR_IA32_MISC_ENABLE]))[r.MSR_IA32_MISC_ENABLE] & 1
    assert (ap.get_lapic().get_reg(r.APIC_LVT_LINT0) >> 8) & 7 == r.APIC_MODE_EXTINT


@pytest.mark.kvm
def test_configure_vcpu_argument_rules(kvm, lm):
    vcpu = lm.vm.create_vcpu(0)
    with pytest.raises(ValueError, match="needs entry_rip"):
        configure_vcpu(vcpu, 0, kvm=kvm, topology=Topology.for_cpus(2))
    with pytest.raises(ValueError, match="application processor"):
        configure_vcpu(vcpu, 1, kvm=kvm, topology=Topology.for_cpus(2), entry_rip=CODE_ADDR)
    with pytest.raises(ValueError, match="CpuModel or a Topology"):
        configure_vcpu(vcpu, 1, kvm=kvm)
    with pytest.raises(ValueError, match="boot processor"):
        r.configure_application_processor(vcpu, 0, kvm=kvm, topology=Topology.for_cpus(1))


def test_boot_msrs_filters_by_host_support():
    leaf1_mtrr = [CpuidEntry(1, edx=r.LEAF1_EDX_MTRR)]
    supported = {r.MSR_IA32_TSC, r.MSR_LSTAR, r.MSR_IA32_MISC_ENABLE}
    msrs, skipped = r.boot_msrs(leaf1_mtrr, supported)
    assert dict(msrs) == {r.MSR_IA32_TSC: 0, r.MSR_LSTAR: 0, r.MSR_IA32_MISC_ENABLE: 1,
                          r.MSR_MTRR_DEF_TYPE: 0x806}
    assert r.MSR_STAR in skipped and r.MSR_KERNEL_GS_BASE in skipped
    # Without the MTRR CPUID bit (and not listed by KVM) MTRRdefType is skipped too.
    msrs, skipped = r.boot_msrs([CpuidEntry(1)], supported)
    assert r.MSR_MTRR_DEF_TYPE in skipped and r.MSR_MTRR_DEF_TYPE not in dict(msrs)


def test_segment_conversion_matches_the_gdt():
    seg = r.kvm_segment(gdt.segment(gdt.CODE_SELECTOR))
    assert (seg.selector, seg.base, seg.limit, seg.type, seg.present, seg.dpl, seg.db, seg.s,
            seg.l, seg.g, seg.unusable) == (0x10, 0, 0xFFFF_FFFF, 0xB, 1, 0, 0, 1, 1, 1, 0)
