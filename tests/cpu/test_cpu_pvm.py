"""pvm compatibility: detection, guest options, and finishing emulation failures.

Two kinds of test, named for what they are: the ``real_`` ones provoke genuine emulation
failures on a real vCPU (only a ring-0-emulating host produces them, so they skip elsewhere);
the ``constructed_`` ones feed hand-made exits to a stand-in vCPU to pin down the decision logic.
"""

import struct

import pytest

from cpu.cpu_guest_helpers import CODE_ADDR, TEST_IDT_ADDR, idt_gate, make_vm
from pystratovirt.cpu import Topology, configure_vcpu, pvm
from pystratovirt.kvm import InternalError, InternalSuberror, IoOut
from pystratovirt.kvm import structs as s
from pystratovirt.kvm.vcpu import Translation
from pystratovirt.memory import GuestMemory, layout


# -- detection and options -------------------------------------------------------------------------
def test_detect_follows_sysfs(tmp_path):
    present = tmp_path / "kvm_pvm"
    present.mkdir()
    assert pvm.detect({}, str(present)) is True
    assert pvm.detect({}, str(tmp_path / "absent")) is False


def test_detect_env_override(tmp_path):
    present = tmp_path / "kvm_pvm"
    present.mkdir()
    assert pvm.detect({"PYSTRATOVIRT_PVM": "0"}, str(present)) is False
    assert pvm.detect({"PYSTRATOVIRT_PVM": "1"}, str(tmp_path / "absent")) is True
    assert pvm.detect({"PYSTRATOVIRT_PVM": ""}, str(present)) is True  # empty: no override
    with pytest.raises(ValueError):
        pvm.detect({"PYSTRATOVIRT_PVM": "maybe"}, str(present))


def test_detect_reads_the_process_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PYSTRATOVIRT_PVM", "1")
    assert pvm.detect(sysfs_path=str(tmp_path / "absent")) is True


def test_guest_cmdline_options():
    assert pvm.guest_cmdline_options() == (
        "noxsave clearcpuid=308,515,288,151,158,306,298,145,311,312,291,296,137,147,148,153,156 "
        "mitigations=off")


# -- constructed exits on a stand-in vCPU ----------------------------------------------------------
class FakeVcpu:
    """Just the vCPU calls handle_emulation_failure makes, over a 64-bit identity-mapped guest."""

    index = 0

    def __init__(self, rip, mapped=True):
        self.regs = s.kvm_regs(rip=rip)
        self.sregs = s.kvm_sregs()
        self.sregs.efer = pvm.EFER_LMA
        self.sregs.cs.l = 1
        self.events = s.kvm_vcpu_events()
        self.events_set = None
        self.mapped = mapped

    def get_regs(self):
        return s.kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, regs):
        self.regs = s.kvm_regs.from_buffer_copy(regs)

    def get_sregs(self):
        return self.sregs

    def get_vcpu_events(self):
        return s.kvm_vcpu_events.from_buffer_copy(self.events)

    def set_vcpu_events(self, events):
        self.events_set = s.kvm_vcpu_events.from_buffer_copy(events)

    def translate(self, gva):
        return Translation(gva, gva, self.mapped, True, False)


def emulation_failure(insn: bytes | None) -> InternalError:
    return InternalError(InternalSuberror.EMULATION, 3, (1, 0, 0), insn)


@pytest.fixture
def memory():
    mem = GuestMemory(1 << 20)
    yield mem
    mem.close()


def test_constructed_int3_injects_bp_past_the_int3(memory):
    vcpu = FakeVcpu(rip=0x1000)
    line = pvm.handle_emulation_failure(vcpu, emulation_failure(b"\xcc\x90"), memory)
    assert "int3" in line and "0x1000" in line
    assert vcpu.regs.rip == 0x1001
    ev = vcpu.events_set
    assert (ev.exception.injected, ev.exception.nr, ev.exception.has_error_code) == (1, 3, 0)


def test_constructed_fwait_steps_over(memory):
    vcpu = FakeVcpu(rip=0x2000)
    line = pvm.handle_emulation_failure(vcpu, emulation_failure(b"\x9b"), memory)
    assert "fwait" in line
    assert vcpu.regs.rip == 0x2001 and vcpu.events_set is None


def test_constructed_exit_without_bytes_reads_guest_memory(memory):
    memory.write(0x3000, b"\x9b\x90")
    vcpu = FakeVcpu(rip=0x3000)
    pvm.handle_emulation_failure(vcpu, emulation_failure(None), memory)
    assert vcpu.regs.rip == 0x3001


def test_constructed_instruction_read_stops_at_the_end_of_ram(memory):
    vcpu = FakeVcpu(rip=(1 << 20) - 2)
    memory.write((1 << 20) - 2, b"\x0f\x0b")
    with pytest.raises(pvm.UnhandledEmulationFailure) as info:
        pvm.handle_emulation_failure(vcpu, emulation_failure(None), memory)
    assert info.value.insn_bytes == b"\x0f\x0b"  # the two bytes that exist, no more
    assert "0f 0b" in str(info.value) and hex((1 << 20) - 2) in str(info.value)


def test_constructed_unknown_instruction_is_explained(memory):
    vcpu = FakeVcpu(rip=0xFFFF_FFFF_8100_0000)
    with pytest.raises(pvm.UnhandledEmulationFailure) as info:
        pvm.handle_emulation_failure(vcpu, emulation_failure(bytes.fromhex("f0480fc70e")), memory)
    msg = str(info.value)
    assert "rip 0xffffffff81000000" in msg and "f0 48 0f c7 0e" in msg
    assert info.value.rip == 0xFFFF_FFFF_8100_0000
    assert vcpu.regs.rip == 0xFFFF_FFFF_8100_0000  # nothing changed


def test_constructed_unreadable_instruction(memory):
    vcpu = FakeVcpu(rip=0x5000, mapped=False)
    with pytest.raises(pvm.UnhandledEmulationFailure, match="not readable"):
        pvm.handle_emulation_failure(vcpu, emulation_failure(None), memory)
    vcpu = FakeVcpu(rip=0x4000_0000)  # mapped, but no RAM there
    with pytest.raises(pvm.UnhandledEmulationFailure, match="not readable"):
        pvm.handle_emulation_failure(vcpu, emulation_failure(b""), memory)


def test_constructed_other_exits_are_not_ours(memory):
    vcpu = FakeVcpu(rip=0)
    other = InternalError(InternalSuberror.DELIVERY_EV, 0, (), None)
    assert pvm.handle_emulation_failure(vcpu, other, memory) is None
    assert pvm.handle_emulation_failure(vcpu, IoOut(0x3F8, 1, 1, 0, memoryview(b"x")), memory) is None


def test_constructed_real_mode_uses_cs_base(memory):
    vcpu = FakeVcpu(rip=0x10)
    vcpu.sregs.efer = 0
    vcpu.sregs.cs.l = 0
    vcpu.sregs.cs.base = 0x7000
    memory.write(0x7010, b"\x9b")
    pvm.handle_emulation_failure(vcpu, emulation_failure(None), memory)
    assert vcpu.regs.rip == 0x11


# -- real emulation failures -----------------------------------------------------------------------
BP_HANDLER = CODE_ADDR + 0x100
GUEST = bytes.fromhex(
    "b042"        # mov al, 0x42
    "66baf803"    # mov dx, 0x3f8
    "ee"          # out dx, al              -> 'B'
    "cc"          # int3                    (CODE+7)
    "9b"          # fwait                   (CODE+8)
    "b043"        # mov al, 0x43
    "66baf803"    # mov dx, 0x3f8
    "ee"          # out dx, al              -> 'C'
    "ebfe")       # jmp $
BP = bytes.fromhex(
    "488b0424"    # mov rax, [rsp]          the return RIP the #BP frame holds
    "66baf903"    # mov dx, 0x3f9
    "ef"          # out dx, eax
    "48cf")       # iretq


def _guest(kvm, code=GUEST):
    lm = make_vm(kvm)
    lm.memory.write(CODE_ADDR, code)
    lm.memory.write(BP_HANDLER, BP)
    lm.memory.write(TEST_IDT_ADDR + 16 * 3, idt_gate(BP_HANDLER))
    vcpu = lm.vm.create_vcpu(0)
    configure_vcpu(vcpu, 0, kvm=kvm, topology=Topology.for_cpus(1), entry_rip=CODE_ADDR,
                   boot_params_addr=layout.ZERO_PAGE_ADDR)
    sregs = vcpu.get_sregs()
    sregs.idt.base = TEST_IDT_ADDR
    sregs.idt.limit = 16 * 256 - 1
    vcpu.set_sregs(sregs)
    return lm, vcpu


def _need_emulation_failure(ex):
    if not (isinstance(ex, InternalError) and ex.is_emulation_failure):
        pytest.skip(f"this host ran the instruction natively (exit {ex!r}); no emulation failure")


@pytest.mark.kvm
def test_real_int3_and_fwait_emulation_failures(kvm):
    lm, vcpu = _guest(kvm)
    try:
        ex = vcpu.run()
        assert isinstance(ex, IoOut) and ex.data == b"B"
        ex = vcpu.run()
        _need_emulation_failure(ex)
        assert ex.insn_bytes and ex.insn_bytes[0] == 0xCC  # the cap delivered the bytes
        line = pvm.handle_emulation_failure(vcpu, ex, lm.memory)
        assert line == f"pvm: vCPU 0 int3 at rip {CODE_ADDR + 7:#x}: injected #BP"
        ex = vcpu.run()  # the guest's #BP handler reports the RIP in its frame
        assert isinstance(ex, IoOut) and ex.port == 0x3F9
        assert struct.unpack("<I", ex.data)[0] == CODE_ADDR + 8  # a trap: just past the int3
        ex = vcpu.run()
        _need_emulation_failure(ex)
        assert ex.insn_bytes[0] == 0x9B
        line = pvm.handle_emulation_failure(vcpu, ex, lm.memory)
        assert line == f"pvm: vCPU 0 fwait at rip {CODE_ADDR + 8:#x}: stepped over"
        ex = vcpu.run()
        assert isinstance(ex, IoOut) and ex.data == b"C"
    finally:
        lm.close()


@pytest.mark.kvm
def test_real_failure_with_bytes_read_back_through_kvm_translate(kvm):
    """A real failing int3, handled as if the exit had carried no bytes: the handler must find
    them by translating RIP with KVM_TRANSLATE and reading guest RAM."""
    lm, vcpu = _guest(kvm)
    try:
        vcpu.run()
        ex = vcpu.run()
        _need_emulation_failure(ex)
        assert pvm.read_insn_bytes(vcpu, lm.memory, CODE_ADDR + 7, 3) == bytes.fromhex("cc9bb0")
        stripped = InternalError(ex.suberror, ex.ndata, ex.data, None)
        assert "int3" in pvm.handle_emulation_failure(vcpu, stripped, lm.memory)
        ex = vcpu.run()
        assert isinstance(ex, IoOut) and ex.port == 0x3F9
    finally:
        lm.close()


@pytest.mark.kvm
def test_real_unhandled_instruction_is_reported(kvm):
    code = bytes.fromhex(
        "be00200000"    # mov esi, 0x2000
        "f0480fc70e"    # lock cmpxchg16b [rsi]   (missing from the ring-0 emulator)
        "ebfe")
    lm, vcpu = _guest(kvm, code)
    try:
        ex = vcpu.run()
        _need_emulation_failure(ex)
        with pytest.raises(pvm.UnhandledEmulationFailure) as info:
            pvm.handle_emulation_failure(vcpu, ex, lm.memory)
        assert info.value.rip == CODE_ADDR + 5
        assert "f0 48 0f c7 0e" in str(info.value)
    finally:
        lm.close()


@pytest.mark.kvm
def test_real_ldmxcsr_and_stmxcsr_done_by_the_vmm(kvm):
    """Debian's kernel_fpu_begin runs ldmxcsr, which this host's ring-0 emulator lacks: the VMM
    decodes the memory operand, moves the value through MXCSR itself and steps over it."""
    code = bytes.fromhex(
        "be00200000"    # mov esi, 0x2000
        "0fae5604"      # ldmxcsr [rsi+4]          (CODE+5, 4 bytes)
        "0fae5e08"      # stmxcsr [rsi+8]          (CODE+9, 4 bytes)
        "8b4608"        # mov eax, [rsi+8]
        "66baf903"      # mov dx, 0x3f9
        "ef"            # out dx, eax
        "ebfe")
    lm, vcpu = _guest(kvm, code)
    lm.memory.write_u32(0x2004, 0x1F80 | 0x40)  # default MXCSR plus DAZ, to see it round-trip
    try:
        for _ in range(4):
            ex = vcpu.run()
            if isinstance(ex, IoOut):
                break
            _need_emulation_failure(ex)
            assert "mxcsr" in pvm.handle_emulation_failure(vcpu, ex, lm.memory)
        assert isinstance(ex, IoOut) and ex.port == 0x3F9
        assert struct.unpack("<I", ex.data)[0] == 0x1FC0
        assert lm.memory.read_u32(0x2008) == 0x1FC0
        assert vcpu.get_mxcsr() == 0x1FC0
    finally:
        lm.close()
