"""The CPU model: rules applied to a hand-made 'supported CPUID' table, then the real host's."""

import pytest

from pystratovirt.cpu import cpuid as c
from pystratovirt.cpu.cpuid import CpuModel, Topology, find
from pystratovirt.kvm import Cap
from pystratovirt.kvm.structs import KVM_CPUID_FLAG_SIGNIFICANT_INDEX as SIG
from pystratovirt.kvm.structs import CpuidEntry as E


def regs_of(vendor: bytes):
    words = [int.from_bytes(vendor[i:i + 4], "little") for i in (0, 4, 8)]
    return dict(ebx=words[0], edx=words[1], ecx=words[2])


HOST_L3 = 0x0400_4163  # L3, 2 threads sharing (host value), 2 cores per package (host value)
SUPPORTED = [
    E(0, eax=0x1F, **regs_of(b"GenuineIntel")),
    E(1, eax=0x806F8, ebx=0x0004_0800 | 0x07, ecx=c.LEAF1_ECX_CX16 | (1 << 21) | 1,
      edx=0x0F8B_FBFF),
    E(4, 0, SIG, eax=0x0400_0121, ebx=0x02C0_003F, ecx=0x3F),
    E(4, 1, SIG, eax=0x0400_0122, ebx=0x01C0_003F, ecx=0x3F),
    E(4, 2, SIG, eax=0x0400_0143, ebx=0x03C0_003F, ecx=0x7FF),
    E(4, 3, SIG, eax=HOST_L3, ebx=0x03C0_003F, ecx=0x77FFF),
    E(4, 4, SIG),
    E(6, eax=4, ecx=c.LEAF6_ECX_EPB | 1),
    E(0xA, eax=0x0730_0805, ebx=0xFF, edx=0x603),  # PMU version 5
    E(0xB, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=9),
    E(0xB, 1, SIG, eax=5, ebx=32, ecx=0x201, edx=9),
    E(0x1F, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=9),
    E(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
    E(0x4000_0001, eax=0x0100_7EFB),
    E(0x8000_0000, eax=0x8000_0008),
    E(0x8000_0002), E(0x8000_0003), E(0x8000_0004),
    E(0x8000_0008, eax=0x3930),
]


def model(cpus=4, max_cpus=None, **kw):
    kw.setdefault("tsc_deadline", True)
    return CpuModel(SUPPORTED, Topology.for_cpus(cpus, max_cpus), **kw)


def leaf(entries, fn, index=0):
    e = find(entries, fn, index)
    assert e is not None, f"leaf {fn:#x}.{index} missing"
    return e


def test_leaf1_hypervisor_set_and_cx16_masked():
    e = leaf(model().entries_for(0), 1)
    assert e.ecx & c.LEAF1_ECX_HYPERVISOR
    assert not e.ecx & c.LEAF1_ECX_CX16
    assert e.ecx & (1 << 21) and e.ecx & 1  # other features untouched
    assert e.eax == 0x806F8


def test_cx16_kept_when_not_masked():
    e = leaf(model(mask_cx16=False).entries_for(0), 1)
    assert e.ecx & c.LEAF1_ECX_CX16


def test_tsc_deadline_follows_the_host():
    assert leaf(model(tsc_deadline=True).entries_for(0), 1).ecx & c.LEAF1_ECX_TSC_DEADLINE
    assert not leaf(model(tsc_deadline=False).entries_for(0), 1).ecx & c.LEAF1_ECX_TSC_DEADLINE


@pytest.mark.parametrize("index", [0, 1, 3])
def test_leaf1_ebx_apic_id_and_logical_count(index):
    e = leaf(model(cpus=4).entries_for(index), 1)
    assert e.ebx >> 24 == index
    assert (e.ebx >> 16) & 0xFF == 4
    assert e.ebx & 0xFFFF == 0x0807  # CLFLUSH size and brand index kept
    assert e.edx & c.LEAF1_EDX_HTT


def test_single_cpu_has_no_htt():
    e = leaf(model(cpus=1).entries_for(0), 1)
    assert (e.ebx >> 16) & 0xFF == 1
    assert not e.edx & c.LEAF1_EDX_HTT


def test_leaf4_cores_and_sharing():
    entries = model(cpus=6).entries_for(2)
    for sub in range(4):
        e = leaf(entries, 4, sub)
        host = leaf(SUPPORTED, 4, sub)
        assert e.eax >> 26 == 5                       # 6 cores per package
        assert e.eax & 0x3FFF == host.eax & 0x3FFF    # type, level, flags from the host
        assert (e.ebx, e.ecx, e.edx) == (host.ebx, host.ecx, host.edx)
        level = (e.eax >> 5) & 7
        sharing = ((e.eax >> 14) & 0xFFF) + 1
        assert sharing == (1 if level <= 2 else 6)
    assert leaf(entries, 4, 4) == leaf(SUPPORTED, 4, 4)  # the null terminator stays null


@pytest.mark.parametrize("cpus,max_cpus", [(1, 1), (2, 2), (3, 3), (4, 8), (5, 5), (8, 8),
                                           (64, 64), (100, 254)])
def test_topology_leaves_are_consistent(cpus, max_cpus):
    m = model(cpus, max_cpus)
    bits = None
    for index in range(max_cpus):
        entries = m.entries_for(index)
        subs = [e for e in entries if e.function == 0xB]
        assert [e.index for e in subs] == [0, 1, 2]
        smt, core, end = subs
        assert all(e.flags & SIG for e in subs)
        assert all(e.edx == index for e in subs)  # x2APIC id
        assert (smt.ecx >> 8 & 0xFF, smt.ecx & 0xFF, smt.eax, smt.ebx) == (1, 0, 0, 1)
        assert (core.ecx >> 8 & 0xFF, core.ecx & 0xFF, core.ebx) == (2, 1, max_cpus)
        assert (end.ecx >> 8 & 0xFF, end.ecx & 0xFF, end.eax, end.ebx) == (0, 2, 0, 0)
        # Every APIC id of the package shifts down to package 0, and the field is no wider
        # than needed.
        assert index >> core.eax == 0
        assert (1 << core.eax) >= max_cpus and (max_cpus == 1 or (1 << (core.eax - 1)) < max_cpus)
        bits = core.eax if bits is None else bits
        assert core.eax == bits  # all vCPUs agree
        # 0x1F mirrors 0xB when the host has it.
        assert [(e.index, e.eax, e.ebx, e.ecx, e.edx) for e in entries if e.function == 0x1F] == \
               [(e.index, e.eax, e.ebx, e.ecx, e.edx) for e in subs]
        assert leaf(entries, 1).ebx >> 24 == index


def test_model_sized_by_max_cpus_not_online_cpus():
    m = model(cpus=2, max_cpus=8)
    entries = m.entries_for(7)  # an offline slot still has a consistent table
    assert (leaf(entries, 1).ebx >> 16) & 0xFF == 8
    assert leaf(entries, 0xB, 1).ebx == 8
    assert leaf(entries, 4, 0).eax >> 26 == 7
    with pytest.raises(ValueError):
        m.entries_for(8)


def test_leaf6_epb_cleared():
    e = leaf(model().entries_for(0), 6)
    assert not e.ecx & c.LEAF6_ECX_EPB
    assert e.ecx & 1 and e.eax == 4


@pytest.mark.parametrize("eax,kept", [(0x0730_0805, False), (0x0730_0402, True),
                                      (0x0730_0002, False), (0, False)])
def test_leaf_a_only_for_a_v2_pmu_with_counters(eax, kept):
    supported = [e if e.function != 0xA else E(0xA, eax=eax, ebx=0x12, edx=0x603) for e in SUPPORTED]
    e = leaf(CpuModel(supported, Topology.for_cpus(1), tsc_deadline=False).entries_for(0), 0xA)
    if kept:
        assert (e.eax, e.ebx, e.edx) == (eax, 0x12, 0x603)
    else:
        assert (e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0)


def test_paravirt_leaves_passed_through():
    entries = model().entries_for(1)
    for fn in (0x4000_0000, 0x4000_0001):
        assert leaf(entries, fn) == leaf(SUPPORTED, fn)


def test_brand_string_leaves():
    entries = model(brand="pystratovirt test CPU").entries_for(0)
    raw = b"".join(r.to_bytes(4, "little") for fn in c.BRAND_LEAVES
                   for e in [leaf(entries, fn)] for r in (e.eax, e.ebx, e.ecx, e.edx))
    assert len(raw) == 48
    assert raw.rstrip(b"\0") == b"pystratovirt test CPU"
    # Without a brand, KVM's values are kept.
    assert leaf(model().entries_for(0), 0x8000_0002) == leaf(SUPPORTED, 0x8000_0002)
    # Over-long brands are cut to 47 bytes plus the NUL.
    raw = b"".join(r.to_bytes(4, "little") for e in c._brand_regs("x" * 60) for r in e)
    assert raw == b"x" * 47 + b"\0"


def test_host_brand_string(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU @ 1GHz\n")
    assert c.host_brand_string(str(info)) == "Test CPU @ 1GHz"
    assert c.host_brand_string(str(tmp_path / "missing")) is None


def test_amd_core_count_leaf():
    supported = [E(0, eax=0x10, **regs_of(b"AuthenticAMD")) if e.function == 0 else e
                 for e in SUPPORTED]
    m = CpuModel(supported, Topology.for_cpus(6), tsc_deadline=False)
    assert m.vendor == "AuthenticAMD"
    e = leaf(m.entries_for(0), 0x8000_0008)
    assert e.ecx & 0xFF == 5 and (e.ecx >> 12) & 0xF == 3
    # Intel: untouched.
    assert leaf(model().entries_for(0), 0x8000_0008) == leaf(SUPPORTED, 0x8000_0008)


def test_vcpus_differ_only_in_apic_id_fields():
    m = model(cpus=4)
    a, b = m.entries_for(0), m.entries_for(3)
    diffs = {(x.function, x.index) for x, y in zip(a, b, strict=True) if x != y}
    assert diffs == {(1, 0), (0xB, 0), (0xB, 1), (0xB, 2), (0x1F, 0), (0x1F, 1), (0x1F, 2)}
    assert m.supported == tuple(SUPPORTED)  # the model never mutates its input


# -- Topology --------------------------------------------------------------------------------------
def test_topology_default_is_one_socket_per_vcpu():
    t = Topology.for_cpus(3, 5)
    assert (t.cpus, t.max_cpus, t.sockets, t.cores, t.threads) == (3, 5, 5, 1, 1)
    assert [t.qmp_ids(i) for i in range(5)] == [(i, 0, 0) for i in range(5)]
    assert t.package_cpus == 5 and t.core_id_bits == 3


def test_topology_custom_qmp_ids():
    t = Topology(cpus=8, max_cpus=8, sockets=2, cores=2, threads=2)
    assert t.qmp_ids(0) == (0, 0, 0)
    assert t.qmp_ids(1) == (0, 0, 1)
    assert t.qmp_ids(2) == (0, 1, 0)
    assert t.qmp_ids(5) == (1, 0, 1)
    assert t.qmp_ids(7) == (1, 1, 1)
    assert t.apic_id(5) == 5


@pytest.mark.parametrize("kwargs", [
    dict(cpus=0, max_cpus=1, sockets=1, cores=1, threads=1),
    dict(cpus=3, max_cpus=2, sockets=2, cores=1, threads=1),
    dict(cpus=2, max_cpus=4, sockets=2, cores=1, threads=1),
    dict(cpus=1, max_cpus=255, sockets=255, cores=1, threads=1),
    dict(cpus=1, max_cpus=2, sockets=2, cores=0, threads=1),
])
def test_topology_validation(kwargs):
    with pytest.raises(ValueError):
        Topology(**kwargs)


# -- on the real host --------------------------------------------------------------------------------
@pytest.mark.kvm
def test_real_host_model_survives_set_cpuid2(kvm):
    """KVM (and a ring-0-emulating host, which ORs in features it cannot hide) keeps our rules."""
    m = CpuModel.from_kvm(kvm, Topology.for_cpus(4))
    assert m.tsc_deadline == bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER))
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(2)
        entries = m.entries_for(2)
        vcpu.set_cpuid2(entries)
        back = vcpu.get_cpuid2()
        vcpu.close()
    l1 = leaf(back, 1)
    assert l1.ecx & c.LEAF1_ECX_HYPERVISOR
    assert not l1.ecx & c.LEAF1_ECX_CX16
    assert l1.ebx >> 24 == 2 and (l1.ebx >> 16) & 0xFF == 4
    for fn in (0xB, 0x1F):
        ours = [e for e in entries if e.function == fn]
        assert [e for e in back if e.function == fn] == ours
    brand = b"".join(r.to_bytes(4, "little") for fn in c.BRAND_LEAVES
                     for e in [leaf(back, fn)] for r in (e.eax, e.ebx, e.ecx, e.edx))
    assert brand.strip(b"\0"), "the guest should see some brand string"
