"""The state-transfer ioctls on the real /dev/kvm: set a value, read it back.

vCPU: XSAVE (KVM_GET_XSAVE, KVM_GET_XSAVE2), XCRs, debug registers, TSC rate, KVMCLOCK_CTRL, and
the TSC-deadline MSR's dependence on the LAPIC timer mode (why ``cpu.state`` restores it after
the LAPIC). VM: the PICs and IOAPIC (KVM_GET/SET_IRQCHIP), the PIT (KVM_GET/SET_PIT2) and the
kvmclock (KVM_GET/SET_CLOCK).
"""

import ctypes
import errno
import time

import pytest

from kvm.kvm_guest_helpers import RealModeGuest
from pystratovirt.kvm import Cap, IoOut
from pystratovirt.kvm import structs as s

pytestmark = pytest.mark.kvm

MSR_KVM_SYSTEM_TIME_NEW = 0x4B56_4D01
MSR_IA32_TSC_DEADLINE = 0x6E0
APIC_LVTT = 0x320
LVTT_TSC_DEADLINE = 2 << 17
PVCLOCK_GUEST_STOPPED = 1 << 1


@pytest.fixture
def guest(kvm):
    g = RealModeGuest(kvm, bytes.fromhex("e680" "e680" "ebfe"), irqchip=True, pit=True)
    # out 0x80, al ; out 0x80, al ; jmp $
    yield g
    g.close()


def test_xsave_area_round_trips(guest):
    v = guest.vcpu
    assert v.xsave_size >= s.KVM_XSAVE_SIZE
    xs = v.get_xsave()
    assert ctypes.sizeof(xs) == s.KVM_XSAVE_SIZE
    # XMM0 is at byte 160 of the legacy FXSAVE region; XSTATE_BV (byte 512) must say SSE state
    # is present, or KVM loads the SSE registers in their initial (zero) state.
    for i in range(4):
        xs.region[40 + i] = 0x1111_1111 * (i + 1)
    xs.region[128] |= 0x3
    v.set_xsave(xs)
    assert list(v.get_xsave().region[40:44]) == [0x1111_1111, 0x2222_2222, 0x3333_3333, 0x4444_4444]
    area = v.get_xsave_area()
    assert ctypes.sizeof(area) == v.xsave_size
    assert bytes(area)[:s.KVM_XSAVE_SIZE] == bytes(v.get_xsave())


def test_xsave2_size_comes_from_the_vm(kvm, guest):
    size = guest.vm.check_extension(Cap.XSAVE2)
    assert guest.vcpu.xsave2_size == size
    if not size:
        with pytest.raises(OSError):
            guest.vcpu.get_xsave2()
        return
    assert size >= s.KVM_XSAVE_SIZE
    assert ctypes.sizeof(guest.vcpu.get_xsave2()) == size


def test_set_xsave_refuses_a_buffer_kvm_would_read_past():
    from pystratovirt.kvm.vcpu import Vcpu

    class Sized(Vcpu):  # only the size check runs: no fd is touched
        def __init__(self):
            self.xsave2_size = 8192

    with pytest.raises(ValueError, match="shorter than the 8192 bytes"):
        Sized().set_xsave(s.kvm_xsave())
    with pytest.raises(ValueError):
        s.kvm_xsave_with(4097)
    assert ctypes.sizeof(s.kvm_xsave_with(8192)) == 8192


def test_xcr0_round_trips(kvm, guest):
    v = guest.vcpu
    supported = kvm.get_supported_cpuid()
    v.set_cpuid2(supported)  # KVM checks XCR0 against the guest's CPUID leaf 0xD
    xcrs = v.get_xcrs()
    leaf_d = [e for e in supported if (e.function, e.index) == (0xD, 0)]
    if xcrs.nr_xcrs == 0 or not leaf_d or not leaf_d[0].eax & 0x2:
        pytest.skip("this host's KVM has no XCR0 with SSE state to offer")
    assert xcrs.nr_xcrs == 1 and xcrs.xcrs[0].xcr == 0 and xcrs.xcrs[0].value & 1  # x87 always
    xcrs.xcrs[0].value = 0x3  # x87 + SSE
    v.set_xcrs(xcrs)
    assert v.get_xcrs().xcrs[0].value == 0x3
    xcrs.xcrs[0].value = 0x2  # SSE without x87 is architecturally invalid
    with pytest.raises(OSError) as info:
        v.set_xcrs(xcrs)
    assert info.value.errno == errno.EINVAL


def test_debug_registers_round_trip(guest):
    v = guest.vcpu
    regs = v.get_debugregs()
    assert regs.dr6 & 0xFFFF0FF0 == 0xFFFF0FF0 and regs.dr7 & 0x400  # reset values
    for i, addr in enumerate((0xA000, 0xB000, 0xC000, 0xD000)):
        regs.db[i] = addr
    regs.dr7 = 0x400 | (1 << 1) | (1 << 16)  # G0: data writes to DR0's address
    v.set_debugregs(regs)
    back = v.get_debugregs()
    assert list(back.db) == [0xA000, 0xB000, 0xC000, 0xD000]
    assert back.dr7 == regs.dr7


def test_tsc_khz(kvm, guest):
    v = guest.vcpu
    khz = v.get_tsc_khz()
    assert khz > 100_000  # >= 100 MHz on anything that runs KVM
    v.set_tsc_khz(khz)  # the host's own rate is always accepted
    assert v.get_tsc_khz() == khz
    if kvm.check_extension(Cap.TSC_CONTROL):
        v.set_tsc_khz(khz // 2)
        assert v.get_tsc_khz() == khz // 2
    else:  # no TSC scaling: a slower guest TSC cannot be done
        with pytest.raises(OSError) as info:
            v.set_tsc_khz(khz // 2)
        assert info.value.errno == errno.EINVAL


def test_kvmclock_ctrl_marks_the_pvclock_page_stopped(kvm, guest):
    if not kvm.check_extension(Cap.KVMCLOCK_CTRL):
        pytest.skip("no KVM_CAP_KVMCLOCK_CTRL")
    v = guest.vcpu
    with pytest.raises(OSError) as info:
        v.kvmclock_ctrl()  # the guest has not enabled kvmclock
    assert info.value.errno == errno.EINVAL
    pvclock = 0x2000
    v.set_msrs([(MSR_KVM_SYSTEM_TIME_NEW, pvclock | 1)])
    assert isinstance(v.run(), IoOut)  # KVM fills in the pvclock page on entry
    flags_at = pvclock + 29  # struct pvclock_vcpu_time_info.flags
    version = int.from_bytes(guest.ram[pvclock:pvclock + 4], "little")
    assert version and version % 2 == 0 and not guest.ram[flags_at] & PVCLOCK_GUEST_STOPPED
    v.kvmclock_ctrl()
    assert isinstance(v.run(), IoOut)
    assert guest.ram[flags_at] & PVCLOCK_GUEST_STOPPED


def test_tsc_deadline_msr_is_dropped_unless_the_lapic_timer_is_in_deadline_mode(kvm, guest):
    """The reason ``cpu.state`` writes IA32_TSC_DEADLINE only after KVM_SET_LAPIC."""
    if not kvm.check_extension(Cap.TSC_DEADLINE_TIMER):
        pytest.skip("no TSC-deadline timer")
    v = guest.vcpu
    v.set_cpuid2(kvm.get_supported_cpuid())  # with the TSC-deadline CPUID bit
    deadline = 1 << 50
    v.set_msrs([(MSR_IA32_TSC_DEADLINE, deadline)])
    assert v.get_msrs([MSR_IA32_TSC_DEADLINE]) == [(MSR_IA32_TSC_DEADLINE, 0)]
    lapic = v.get_lapic()
    lapic.set_reg(APIC_LVTT, LVTT_TSC_DEADLINE | 0xEE)
    v.set_lapic(lapic)
    v.set_msrs([(MSR_IA32_TSC_DEADLINE, deadline)])
    assert v.get_msrs([MSR_IA32_TSC_DEADLINE]) == [(MSR_IA32_TSC_DEADLINE, deadline)]


def test_pics_and_ioapic_round_trip(guest):
    vm = guest.vm
    master = vm.get_irqchip(s.KVM_IRQCHIP_PIC_MASTER)
    assert master.chip_id == s.KVM_IRQCHIP_PIC_MASTER
    master.chip.pic.imr = 0xFB
    master.chip.pic.irq_base = 0x20
    vm.set_irqchip(master)
    slave = vm.get_irqchip(s.KVM_IRQCHIP_PIC_SLAVE)
    slave.chip.pic.imr = 0xFF
    slave.chip.pic.irq_base = 0x28
    vm.set_irqchip(slave)
    back_master = vm.get_irqchip(s.KVM_IRQCHIP_PIC_MASTER).chip.pic
    back_slave = vm.get_irqchip(s.KVM_IRQCHIP_PIC_SLAVE).chip.pic
    assert (back_master.imr, back_master.irq_base) == (0xFB, 0x20)
    assert (back_slave.imr, back_slave.irq_base) == (0xFF, 0x28)

    ioapic = vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC)
    assert ioapic.chip.ioapic.base_address == 0xFEC0_0000
    assert all(entry & s.IOAPIC_REDIR_MASKED for entry in ioapic.chip.ioapic.redirtbl)  # reset: masked
    entry = 0x33 | s.IOAPIC_REDIR_LEVEL | (1 << s.IOAPIC_REDIR_DEST_SHIFT)
    ioapic.chip.ioapic.redirtbl[3] = entry
    vm.set_irqchip(ioapic)
    back = vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC).chip.ioapic
    assert back.redirtbl[3] == entry
    assert back.redirtbl[4] & s.IOAPIC_REDIR_MASKED


def test_irqchip_state_needs_an_irqchip(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(OSError) as info:
            vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC)
        assert info.value.errno == errno.ENXIO


def test_pit_round_trips(guest):
    vm = guest.vm
    pit = vm.get_pit2()
    ch = pit.channels[0]
    ch.count, ch.mode, ch.rw_mode, ch.gate = 1000, 2, 3, 1
    vm.set_pit2(pit)
    back = vm.get_pit2().channels[0]
    assert (back.count, back.mode, back.rw_mode, back.gate) == (1000, 2, 3, 1)


def test_clock_round_trips(kvm, guest):
    vm = guest.vm
    flags = kvm.check_extension(Cap.ADJUST_CLOCK)
    now = vm.get_clock()
    assert not now.flags & ~flags  # only flags the host says it may fill in
    # KVM pairs the clock with host realtime only while it runs a TSC-based master clock (not in
    # a nested guest whose clocksource is kvm-clock).
    if now.flags & s.KVM_CLOCK_REALTIME:
        assert abs(now.realtime - time.time_ns()) < 5 * 10**9
    target = 10**12  # 1000 s of guest time
    vm.set_clock(s.kvm_clock_data(clock=target))
    later = vm.get_clock().clock
    assert target <= later < target + 5 * 10**9
    # With KVM_CLOCK_REALTIME KVM adds the host time passed since ``realtime`` (here 100 s ago).
    if flags & s.KVM_CLOCK_REALTIME:
        vm.set_clock(s.kvm_clock_data(clock=target, flags=s.KVM_CLOCK_REALTIME,
                                      realtime=time.time_ns() - 100 * 10**9))
        assert target + 100 * 10**9 <= vm.get_clock().clock < target + 105 * 10**9
