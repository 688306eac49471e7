"""VcpuState and VmKernelState on the real /dev/kvm: a guest stopped mid-run continues in a second
VM made from its saved vCPU state, in-kernel device state and memory file, exactly where it
stopped -- the same counter sequence, the same registers at every step, and its LAPIC timer, PIT
and TSC-deadline timer still ticking. Guest code is hand-assembled x86-64 (see the comments).
"""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from cpu.cpu_guest_helpers import CODE_ADDR, TEST_IDT_ADDR, LongModeVm, idt_gate, make_vm, map_lapic_page
from pystratovirt.cpu import CpuModel, Topology, configure_vcpu
from pystratovirt.cpu.regs import MSR_IA32_TSC
from pystratovirt.cpu.state import MSR_IA32_TSC_DEADLINE, StateRestoreError, VcpuState, VmKernelState, saved_msr_indices
from pystratovirt.kvm import Interrupted, IoOut
from pystratovirt.kvm import structs as s
from pystratovirt.memory import GuestMemory, layout

pytestmark = pytest.mark.kvm

RAM = 4 << 20
COUNTER = 0x20_0000      # the loop's counter, in memory
LAPIC_TICKS = 0x20_0008
PIT_TICKS = 0x20_0010
XMM_COPY = 0x20_0020     # where the loop stores XMM1
DEADLINE_DELTA = 0x20_0030
PORT_COUNT, PORT_LAPIC, PORT_PIT, PORT_ARMED = 0x500, 0x501, 0x502, 0x503
VEC_LAPIC, VEC_PIT, VEC_DEADLINE = 0x40, 0x41, 0x42
XMM1 = bytes(range(0x10, 0x20))

LAPIC_TIMER_NS = 7_000_000   # periodic LAPIC timer (divide by 1: KVM counts in ns)
PIT_COUNT = 11932            # ~10 ms at 1.193182 MHz


def _lapic_setup(lvtt: int) -> str:
    return (
        "b80000e0fe"                      # mov eax, 0xfee00000
        "c780f0000000ff010000"            # mov dword [rax+0xf0], 0x1ff   ; SVR: APIC on
        "c780e00300000b000000"            # mov dword [rax+0x3e0], 0xb    ; divide by 1
        "c78020030000" + lvtt.to_bytes(4, "little").hex())  # mov dword [rax+0x320], lvtt


def _tick_handler(counter: int, port: int) -> bytes:
    """push rax/rdx; inc [counter]; out port, [counter]; LAPIC EOI; pop; iretq."""
    c = counter.to_bytes(4, "little").hex()
    return bytes.fromhex(
        "50" "52"                         # push rax ; push rdx
        "48ff0425" + c +                  # inc qword [counter]
        "488b0425" + c +                  # mov rax, [counter]
        "66ba" + port.to_bytes(2, "little").hex() +  # mov dx, port
        "ef"                              # out dx, eax
        "b8b000e0fe"                      # mov eax, 0xfee000b0
        "c70000000000"                    # mov dword [rax], 0     ; EOI
        "5a" "58"                         # pop rdx ; pop rax
        "48cf")                           # iretq


COUNTING_GUEST = bytes.fromhex(
    _lapic_setup(0x2_0000 | VEC_LAPIC) +  # LVT timer: periodic, vector 0x40
    "c78080030000" + LAPIC_TIMER_NS.to_bytes(4, "little").hex() +  # initial count
    "b034" "e643"                         # PIT: channel 0, lobyte/hibyte, mode 2
    "b0" + f"{PIT_COUNT & 0xFF:02x}" + "e640"  # count, low byte
    "b0" + f"{PIT_COUNT >> 8:02x}" + "e640"    # count, high byte
    "66ba0005"                            # mov dx, 0x500
    "fb"                                  # sti
    # loop:
    "48ffc3"                              # inc rbx
    "48891c2500002000"                    # mov [0x200000], rbx
    "4801d9"                              # add rcx, rbx
    "f30f7f0c2520002000"                  # movdqu [0x200020], xmm1
    "89d8"                                # mov eax, ebx
    "ef"                                  # out dx, eax
    "ebe4")                               # jmp loop

DEADLINE_GUEST = bytes.fromhex(
    _lapic_setup(0x4_0000 | VEC_DEADLINE) +  # LVT timer: TSC-deadline mode, vector 0x42
    "0f31"                                # rdtsc
    "48c1e220" "4809d0"                   # shl rdx, 32 ; or rax, rdx
    "4803042530002000"                    # add rax, [0x200030]     ; + delta
    "4889c2" "48c1ea20"                   # mov rdx, rax ; shr rdx, 32
    "b9e0060000"                          # mov ecx, 0x6e0
    "0f30"                                # wrmsr                   ; IA32_TSC_DEADLINE
    "66ba0305" "ef"                       # mov dx, 0x503 ; out dx, eax   ; armed
    "66ba0005"                            # mov dx, 0x500
    "fb"                                  # sti
    # loop:
    "48ffc3"                              # inc rbx
    "89d8"                                # mov eax, ebx
    "ef"                                  # out dx, eax
    "ebf9")                               # jmp loop

DEADLINE_HANDLER = bytes.fromhex(
    "50" "52"                             # push rax ; push rdx
    "66ba0105" "b842000000" "ef"          # mov dx, 0x501 ; mov eax, 0x42 ; out dx, eax
    "5a" "58" "48cf")                     # pop rdx ; pop rax ; iretq


def _install_guest(kvm, lm: LongModeVm, code: bytes, handlers: dict[int, bytes]):
    """Code at CODE_ADDR, handlers after it, an IDT for them, the LAPIC mapped, the PICs masked,
    the boot vCPU configured (and its IDT pointed at the test IDT)."""
    mem = lm.memory
    mem.write(CODE_ADDR, code)
    for n, (vector, handler) in enumerate(sorted(handlers.items())):
        addr = CODE_ADDR + 0x100 * (n + 1)
        mem.write(addr, handler)
        mem.write(TEST_IDT_ADDR + 16 * vector, idt_gate(addr))
    map_lapic_page(mem)
    # Mask both PICs: the PIT's IRQ0 must only arrive through the IOAPIC (a PIC would deliver it
    # as vector irq_base + 0, for which there is no gate).
    for chip_id in (s.KVM_IRQCHIP_PIC_MASTER, s.KVM_IRQCHIP_PIC_SLAVE):
        chip = lm.vm.get_irqchip(chip_id)
        chip.chip.pic.imr = 0xFF
        lm.vm.set_irqchip(chip)
    vcpu = lm.vm.create_vcpu(0)
    configure_vcpu(vcpu, 0, kvm=kvm, model=CpuModel.from_kvm(kvm, Topology.for_cpus(1)),
                   entry_rip=CODE_ADDR, boot_params_addr=layout.ZERO_PAGE_ADDR)
    sregs = vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = TEST_IDT_ADDR, 0x100 * 16 - 1
    vcpu.set_sregs(sregs)
    return vcpu


def _route_pit_to(vm, vector: int) -> None:
    """IOAPIC pins 0 and 2 (where a PIT's IRQ0 may be wired) -> ``vector`` on APIC 0, edge."""
    chip = vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC)
    for pin in (0, 2):
        chip.chip.ioapic.redirtbl[pin] = vector
    vm.set_irqchip(chip)


class Recorder:
    """Runs a vCPU and records what the guest says on its ports."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.counts: list[int] = []
        self.regs: list[bytes] = []     # kvm_regs at each counter OUT
        self.ticks: dict[int, list[int]] = {PORT_LAPIC: [], PORT_PIT: []}
        self.armed = False
        self.times: dict[int, float] = {}

    def run_until(self, done, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            assert time.monotonic() < deadline, f"guest too slow: {len(self.counts)} counts, {self.ticks}"
            ex = self.vcpu.run()
            assert isinstance(ex, (IoOut, Interrupted)), ex
            if isinstance(ex, Interrupted):
                continue
            value = int.from_bytes(ex.data, "little")
            if ex.port == PORT_COUNT:
                self.counts.append(value)
                self.regs.append(bytes(self.vcpu.get_regs()))
            elif ex.port == PORT_ARMED:
                self.armed = True
            else:
                self.ticks[ex.port].append(value)
                self.times.setdefault(ex.port, time.monotonic())

    def pause(self) -> None:
        """What the machine's pause does: re-enter once with immediate_exit, so KVM completes
        the last OUT (RIP moves past it) without running guest code."""
        self.vcpu.immediate_exit = True
        assert isinstance(self.vcpu.run(), Interrupted)
        self.vcpu.ack_kick()


def _restored_vm(kvm, memory: GuestMemory, kstate: VmKernelState, vstate: VcpuState):
    lm = make_vm(kvm, pit=True, memory=memory)
    kstate.restore(lm.vm)
    vcpu = lm.vm.create_vcpu(0)
    vstate.restore(vcpu)
    return lm, vcpu


def test_a_second_vm_continues_exactly_where_the_first_stopped(kvm, tmp_path):
    msr_list = kvm.get_msr_index_list()
    vm1 = make_vm(kvm, pit=True, size=RAM)
    vm2 = None
    try:
        vcpu1 = _install_guest(kvm, vm1, COUNTING_GUEST, {VEC_LAPIC: _tick_handler(LAPIC_TICKS, PORT_LAPIC),
                                                          VEC_PIT: _tick_handler(PIT_TICKS, PORT_PIT)})
        _route_pit_to(vm1.vm, VEC_PIT)
        xs = vcpu1.get_xsave_area()  # XMM1 at byte 176 of the legacy area; XSTATE_BV says SSE
        for i in range(4):
            xs.region[44 + i] = int.from_bytes(XMM1[4 * i:4 * i + 4], "little")
        xs.region[128] |= 0x3
        vcpu1.set_xsave(xs)
        dr = vcpu1.get_debugregs()
        dr.db[2] = 0x7777_0000  # not enabled in DR7: only has to survive
        vcpu1.set_debugregs(dr)
        vcpu1.set_msrs([(0xC000_0082, 0xFFFF_FFFF_8123_4560)])  # LSTAR

        # Run VM 1 until both timers have ticked a few times, then stop it as a pause would.
        first = Recorder(vcpu1)
        first.run_until(lambda r: len(r.ticks[PORT_LAPIC]) >= 3 and len(r.ticks[PORT_PIT]) >= 3)
        first.pause()
        stopped_at = first.counts[-1]
        vstate = VcpuState.from_bytes(VcpuState.capture(vcpu1, msr_list).to_bytes())
        kstate = VmKernelState.from_bytes(VmKernelState.capture(vm1.vm).to_bytes())
        mem_file = tmp_path / "memory"
        vm1.memory.save(mem_file)
        lapic_ticks = vm1.memory.read_u64(LAPIC_TICKS)
        pit_ticks = vm1.memory.read_u64(PIT_TICKS)
        assert stopped_at <= vstate.regs.rbx <= stopped_at + 1  # a tick may land mid-loop
        # Stopped right after an OUT (the loop's or a timer handler's), which KVM has completed.
        assert vm1.memory.read_u8(vstate.regs.rip - 1) == 0xEF
        assert kstate.pic_master.imr == 0xFF and kstate.ioapic.redirtbl[0] & 0xFF == VEC_PIT
        assert (kstate.pit.channels[0].count, kstate.pit.channels[0].mode) == (PIT_COUNT, 2)

        # The reference: VM 1 itself carries on for a while.
        steps = 300
        first.counts.clear()
        first.regs.clear()
        first.run_until(lambda r: len(r.counts) >= steps)
        vm1.close()

        # VM 2: a new VM from the saved memory file and state.
        vm2, vcpu2 = _restored_vm(kvm, GuestMemory.from_file(mem_file, RAM), kstate, vstate)
        second = Recorder(vcpu2)
        second.run_until(lambda r: len(r.counts) >= steps and len(r.ticks[PORT_LAPIC]) >= 2
                         and len(r.ticks[PORT_PIT]) >= 2)

        assert second.counts[:steps] == first.counts[:steps] == list(range(stopped_at + 1, stopped_at + 1 + steps))
        assert second.regs[:steps] == first.regs[:steps]  # every register, at every step
        # Both timers kept going from where they were, and their handlers' counts with them.
        assert second.ticks[PORT_LAPIC][:2] == [lapic_ticks + 1, lapic_ticks + 2]
        assert second.ticks[PORT_PIT][:2] == [pit_ticks + 1, pit_ticks + 2]
        assert vm2.memory.read(XMM_COPY, 16) == XMM1  # the XSAVE area came along
        assert vm2.memory.read_u64(COUNTER) >= stopped_at + steps
        with open(mem_file, "rb") as f:  # VM 2's writes stayed in VM 2 (copy-on-write)
            f.seek(COUNTER)
            assert int.from_bytes(f.read(8), "little") == stopped_at
        again = VcpuState.capture(vcpu2, msr_list)
        assert again.debugregs.db[2] == 0x7777_0000
        assert dict(again.msrs)[0xC000_0082] == 0xFFFF_FFFF_8123_4560
    finally:
        vm1.close()
        if vm2 is not None:
            vm2.close()


def test_a_pending_tsc_deadline_fires_in_the_restored_vm(kvm, tmp_path):
    """The deadline is armed in VM 1 and VM 1 is gone before it expires; VM 2 receives it, at the
    right time: the TSC and the deadline were restored, and in the right order (KVM drops a
    deadline written before the LAPIC is in TSC-deadline mode)."""
    msr_list = kvm.get_msr_index_list()
    lm = make_vm(kvm, pit=True, size=RAM)
    vm2 = None
    try:
        vcpu = _install_guest(kvm, lm, DEADLINE_GUEST, {VEC_DEADLINE: DEADLINE_HANDLER})
        delay = 0.4
        lm.memory.write_u64(DEADLINE_DELTA, int(vcpu.get_tsc_khz() * 1000 * delay))
        first = Recorder(vcpu)
        first.run_until(lambda r: r.armed and len(r.counts) >= 1)
        first.pause()
        vstate = VcpuState.capture(vcpu, msr_list)
        kstate = VmKernelState.capture(lm.vm)
        lm.memory.save(tmp_path / "memory")
        msrs = dict(vstate.msrs)
        remaining = (msrs[MSR_IA32_TSC_DEADLINE] - msrs[MSR_IA32_TSC]) / (vstate.tsc_khz * 1000)
        assert 0.1 < remaining <= delay
        assert not first.ticks[PORT_LAPIC]
        lm.close()

        vm2, vcpu2 = _restored_vm(kvm, GuestMemory.from_file(tmp_path / "memory", RAM), kstate, vstate)
        assert dict(VcpuState.capture(vcpu2, msr_list).msrs)[MSR_IA32_TSC_DEADLINE] == msrs[MSR_IA32_TSC_DEADLINE]
        start = time.monotonic()
        second = Recorder(vcpu2)
        second.run_until(lambda r: r.ticks[PORT_LAPIC], timeout=30)
        waited = second.times[PORT_LAPIC] - start
        assert second.ticks[PORT_LAPIC] == [VEC_DEADLINE]
        assert waited >= remaining * 0.5, f"fired after {waited:.3f} s, {remaining:.3f} s were left"
        assert second.counts[0] == first.counts[-1] + 1
    finally:
        lm.close()
        if vm2 is not None:
            vm2.close()


def test_restored_state_reads_back_the_same(kvm):
    """Capture, restore into a fresh vCPU, capture again: equal but for what time moves on."""
    msr_list = kvm.get_msr_index_list()
    one = make_vm(kvm, pit=True)
    two = make_vm(kvm, pit=True)
    try:
        vcpu = one.vm.create_vcpu(0)
        configure_vcpu(vcpu, 0, kvm=kvm, topology=Topology.for_cpus(1), entry_rip=CODE_ADDR,
                       boot_params_addr=layout.ZERO_PAGE_ADDR)
        state = VcpuState.capture(vcpu, msr_list)
        assert [index for index, _ in state.msrs][0] == MSR_IA32_TSC  # restored first
        assert set(saved_msr_indices(msr_list, state.cpuid)) >= {index for index, _ in state.msrs}
        kstate = VmKernelState.capture(one.vm)
        kstate.restore(two.vm)
        other = two.vm.create_vcpu(0)
        state.restore(other)
        back = VcpuState.capture(other, msr_list)
        for name in ("cpuid", "tsc_khz", "xsave", "mp_state"):
            assert getattr(back, name) == getattr(state, name), name
        for name in ("sregs", "regs", "xcrs", "debugregs", "lapic", "events"):
            assert bytes(getattr(back, name)) == bytes(getattr(state, name)), name
        moved = {index for (index, a), (_, b) in zip(state.msrs, back.msrs, strict=True) if a != b}
        assert moved <= {MSR_IA32_TSC}
        kback = VmKernelState.capture(two.vm)
        assert bytes(kback.pic_master) == bytes(kstate.pic_master)
        assert bytes(kback.ioapic) == bytes(kstate.ioapic)
        assert 0 <= kback.clock.clock - kstate.clock.clock < 5 * 10**9  # resumed where it was
    finally:
        one.close()
        two.close()


def test_restore_names_the_part_kvm_refused(kvm):
    msr_list = kvm.get_msr_index_list()
    one = make_vm(kvm, pit=True)
    two = make_vm(kvm, irqchip=False)  # no in-kernel irqchip, so no LAPIC, PICs or PV-EOI
    try:
        vcpu = one.vm.create_vcpu(0)
        configure_vcpu(vcpu, 0, kvm=kvm, topology=Topology.for_cpus(1), entry_rip=CODE_ADDR,
                       boot_params_addr=layout.ZERO_PAGE_ADDR)
        state = VcpuState.capture(vcpu, msr_list)
        with pytest.raises(StateRestoreError) as info:
            state.restore(two.vm.create_vcpu(0))
        assert re.fullmatch(r"KVM refused the saved (MSRs|LAPIC) of vCPU 0 \(.+\)", str(info.value))
        assert info.value.errno
        with pytest.raises(StateRestoreError, match=r"^KVM refused the saved master PIC of the VM \("):
            VmKernelState.capture(one.vm).restore(two.vm)
    finally:
        one.close()
        two.close()


def test_capture_without_an_irqchip_has_no_lapic(kvm):
    lm = make_vm(kvm, irqchip=False)
    try:
        vcpu = lm.vm.create_vcpu(0)
        state = VcpuState.capture(vcpu, kvm.get_msr_index_list())
        assert state.lapic is None
        assert VcpuState.from_bytes(state.to_bytes()).lapic is None
    finally:
        lm.close()


def test_saved_xsave_larger_than_the_host_loads_only_if_the_extra_is_empty(kvm):
    msr_list = kvm.get_msr_index_list()
    lm = make_vm(kvm)
    try:
        vcpu = lm.vm.create_vcpu(0)
        state = VcpuState.capture(vcpu, msr_list)
        padded = dataclasses.replace(state, xsave=state.xsave + bytes(4096))
        padded.restore(lm.vm.create_vcpu(1))  # zeros beyond this host's area: fine
        extra = dataclasses.replace(state, xsave=state.xsave + b"\x01" + bytes(4095))
        with pytest.raises(StateRestoreError, match="holds .* bytes of state, but this host's KVM loads only"):
            extra.restore(lm.vm.create_vcpu(2))
    finally:
        lm.close()


def test_vm_clock_resumes_or_advances_by_host_realtime(kvm):
    one = make_vm(kvm, pit=True)
    two = make_vm(kvm, pit=True)
    try:
        state = VmKernelState.capture(one.vm)
        assert state.clock.flags & s.KVM_CLOCK_REALTIME  # paired with host realtime, always
        # As if captured 100 s ago: by default the clock resumes where it was ...
        clock = s.kvm_clock_data.from_buffer_copy(state.clock)
        clock.realtime -= 100 * 10**9
        old = dataclasses.replace(state, clock=clock)
        old.restore(two.vm)
        assert 0 <= two.vm.get_clock().clock - clock.clock < 5 * 10**9
        # ... and with advance_clock it also counts the 100 s.
        old.restore(two.vm, advance_clock=True)
        assert 100 * 10**9 <= two.vm.get_clock().clock - clock.clock < 105 * 10**9
    finally:
        one.close()
        two.close()
