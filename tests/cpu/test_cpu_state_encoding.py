"""VcpuState and VmKernelState without KVM: the MSR choice, and the byte encodings -- round trips,
the documented layout, and one clear StateFormatError (never IndexError, struct.error, ...) for
anything that is not a saved state: truncated, corrupted, another version, unknown or malformed
records, random bytes."""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystratovirt.cpu.state import (
    FORMAT_VERSION,
    MTRR_FIXED,
    MTRR_VARIABLE,
    StateFormatError,
    VcpuState,
    VmKernelState,
    saved_msr_indices,
)
from pystratovirt.kvm import structs as s
from pystratovirt.kvm.structs import CpuidEntry

VCPU_MAGIC, VM_MAGIC = b"PSVc", b"PSVm"
VCPU_TAGS = range(1, 12)


def sample_vcpu(lapic: bool = True) -> VcpuState:
    regs = s.kvm_regs(rax=1, rbx=0x1122_3344_5566_7788, rip=0x10_0000, rflags=0x202)
    sregs = s.kvm_sregs(cr0=0x8000_0031, cr3=0x9000, cr4=0x620, efer=0x500, apic_base=0xFEE0_0900)
    sregs.cs.selector, sregs.cs.l = 0x10, 1
    xcrs = s.kvm_xcrs(nr_xcrs=1)
    xcrs.xcrs[0].value = 7
    debugregs = s.kvm_debugregs(dr6=0xFFFF_0FF0, dr7=0x400)
    debugregs.db[1] = 0xDEAD_0000
    lapic_state = s.kvm_lapic_state()
    lapic_state.set_reg(0x320, 0x2_0040)
    events = s.kvm_vcpu_events(flags=s.KVM_VCPUEVENT_VALID_NMI_PENDING)
    events.nmi.pending = 1
    xsave = bytes(range(256)) * 16
    return VcpuState(
        cpuid=(CpuidEntry(0, eax=0xD, ebx=0x756E_6547), CpuidEntry(1, eax=0x806EA, edx=1 << 12),
               CpuidEntry(4, 1, s.KVM_CPUID_FLAG_SIGNIFICANT_INDEX, 1, 2, 3, 4)),
        tsc_khz=2_600_000, sregs=sregs, regs=regs, xcrs=xcrs, xsave=xsave, debugregs=debugregs,
        msrs=((0x10, 123456789), (0x174, 0x10), (0xC000_0082, 0xFFFF_FFFF_8100_0000), (0x6E0, 0)),
        lapic=lapic_state if lapic else None, events=events, mp_state=s.KVM_MP_STATE_HALTED)


def sample_vm() -> VmKernelState:
    master = s.kvm_pic_state(imr=0xFB, irq_base=0x20, elcr_mask=0xF8)
    slave = s.kvm_pic_state(imr=0xFF, irq_base=0x28)
    ioapic = s.kvm_ioapic_state(base_address=0xFEC0_0000, id=1)
    ioapic.redirtbl[2] = 0x41
    pit = s.kvm_pit_state2(flags=s.KVM_PIT_FLAGS_SPEAKER_DATA_ON)
    pit.channels[0].count, pit.channels[0].mode = 11932, 2
    clock = s.kvm_clock_data(clock=10**12, flags=s.KVM_CLOCK_REALTIME, realtime=1_700_000_000 * 10**9)
    return VmKernelState(master, slave, ioapic, pit, clock)


def frame(records, *, magic=VCPU_MAGIC, version=FORMAT_VERSION, flags=0) -> bytes:
    """The documented layout, built independently of the module: header, records, CRC-32."""
    out = struct.pack("<4sHH", magic, version, flags)
    for tag, rflags, payload in records:
        out += struct.pack("<HHI", tag, rflags, len(payload)) + payload
    return out + struct.pack("<I", zlib.crc32(out))


def records_of(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 8
    while pos < len(data) - 4:
        tag, rflags, length = struct.unpack_from("<HHI", data, pos)
        out.append((tag, rflags, data[pos + 8:pos + 8 + length]))
        pos += 8 + length
    return out


def one_sentence(exc: BaseException) -> bool:
    text = str(exc)
    return bool(text) and "\n" not in text and not re.search(r"[.!?]\s+[A-Z]", text)


# -- which MSRs --------------------------------------------------------------------------------
def test_saved_msrs_are_kvms_list_without_the_ack_plus_the_mtrrs():
    listed = [0x174, 0x4B56_4D02, 0x4B56_4D07, 0x4B56_4D06, 0x10, 0x6E0, 0x277, 0x174]
    plain = saved_msr_indices(listed, [CpuidEntry(1)])
    assert plain == [0x10, 0x4B56_4D06, 0x174, 0x4B56_4D02, 0x6E0, 0x277]  # TSC, async-PF vector first
    with_mtrr = saved_msr_indices(listed, [CpuidEntry(1, edx=1 << 12)])
    assert with_mtrr[:len(plain)] == plain
    assert with_mtrr[len(plain):] == [0x2FF, *MTRR_FIXED, *MTRR_VARIABLE]
    assert len(MTRR_FIXED) == 11 and len(MTRR_VARIABLE) == 16


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("lapic", [True, False])
def test_vcpu_state_round_trips(lapic):
    state = sample_vcpu(lapic)
    data = state.to_bytes()
    back = VcpuState.from_bytes(data)
    assert back == state and back.to_bytes() == data
    assert back.regs.rbx == 0x1122_3344_5566_7788 and back.sregs.cs.l == 1
    assert back.cpuid == state.cpuid and back.msrs == state.msrs and back.xsave == state.xsave
    assert (back.lapic is None) == (not lapic)
    assert back.events.nmi.pending == 1 and back.mp_state == s.KVM_MP_STATE_HALTED
    assert VcpuState.from_bytes(bytearray(data)) == state == VcpuState.from_bytes(memoryview(data))
    assert state != dataclasses.replace(state, mp_state=0)


def test_vm_state_round_trips():
    state = sample_vm()
    back = VmKernelState.from_bytes(state.to_bytes())
    assert back == state
    assert (back.pic_master.imr, back.ioapic.redirtbl[2], back.pit.channels[0].count) == (0xFB, 0x41, 11932)
    assert back.clock.clock == 10**12


def test_layout_is_the_documented_one():
    data = sample_vcpu().to_bytes()
    assert data[:8] == struct.pack("<4sHH", VCPU_MAGIC, FORMAT_VERSION, 0)
    assert frame(records_of(data)) == data
    tags = {tag: payload for tag, _, payload in records_of(data)}
    assert set(tags) == set(VCPU_TAGS)
    assert tags[4] == bytes(sample_vcpu().regs) and len(tags[3]) == 312  # raw kvm_regs, kvm_sregs
    assert len(sample_vm().to_bytes()) < 600  # compact: the raw structs and 8 bytes per record


# -- what is not a saved state -------------------------------------------------------------------
def test_every_truncation_is_refused():
    data = sample_vcpu().to_bytes()
    for cut in range(len(data)):
        with pytest.raises(StateFormatError) as info:
            VcpuState.from_bytes(data[:cut])
        assert one_sentence(info.value)


def test_every_single_byte_corruption_is_refused():
    data = sample_vm().to_bytes()
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(StateFormatError):
            VmKernelState.from_bytes(bytes(bad))


def test_a_checksum_mismatch_says_so():
    data = bytearray(sample_vcpu().to_bytes())
    data[100] ^= 1
    with pytest.raises(StateFormatError, match="corrupted or truncated"):
        VcpuState.from_bytes(bytes(data))


def test_another_kind_of_state_or_other_bytes():
    with pytest.raises(StateFormatError, match=r"not a saved vCPU state .*b'PSVm'"):
        VcpuState.from_bytes(sample_vm().to_bytes())
    with pytest.raises(StateFormatError, match="not a saved VM state"):
        VmKernelState.from_bytes(sample_vcpu().to_bytes())
    with pytest.raises(StateFormatError, match="is bytes, not str"):
        VcpuState.from_bytes("PSVc")  # type: ignore[arg-type]
    with pytest.raises(StateFormatError, match="truncated"):
        VcpuState.from_bytes(b"")


def test_another_format_version_is_refused():
    data = frame(records_of(sample_vcpu().to_bytes()), version=FORMAT_VERSION + 1)
    with pytest.raises(StateFormatError, match=f"format version {FORMAT_VERSION + 1}, but this pystratovirt "
                                               f"reads version {FORMAT_VERSION}"):
        VcpuState.from_bytes(data)
    with pytest.raises(StateFormatError, match="header flags"):
        VcpuState.from_bytes(frame(records_of(sample_vcpu().to_bytes()), flags=1))


def test_unknown_records_optional_skipped_mandatory_refused():
    records = records_of(sample_vcpu().to_bytes())
    assert VcpuState.from_bytes(frame(records + [(99, 1, b"from the future")])) == sample_vcpu()
    with pytest.raises(StateFormatError, match=r"does not know \(tag 99\); it was written by a newer version"):
        VcpuState.from_bytes(frame(records + [(99, 0, b"from the future")]))
    with pytest.raises(StateFormatError, match="flags 0x2"):
        VcpuState.from_bytes(frame(records + [(99, 2, b"")]))


def test_malformed_records_are_refused():
    records = records_of(sample_vcpu().to_bytes())
    by_tag = {tag: (tag, f, p) for tag, f, p in records}
    cases = {
        "has no MSRs": [r for r in records if r[0] != 8],
        "has its registers twice": records + [by_tag[4]],
        "registers record of the saved vCPU state is 143 bytes, not 144": [
            (t, f, p[:-1] if t == 4 else p) for t, f, p in records],
        "MSRs record of the saved vCPU state is 65 bytes, not up to 4096 entries of 16": [
            (t, f, p + b"\0" if t == 8 else p) for t, f, p in records],
        "XSAVE area record of the saved vCPU state is 4 bytes, not a multiple of 4 from 4096": [
            (t, f, b"\0" * 4 if t == 6 else p) for t, f, p in records],
        "MP state record of the saved vCPU state is 3 bytes, not 4": [
            (t, f, b"\0" * 3 if t == 11 else p) for t, f, p in records],
        "CPUID record of the saved vCPU state is 10280 bytes, not up to 256 entries": [
            (t, f, b"\0" * 40 * 257 if t == 1 else p) for t, f, p in records],
    }
    for message, recs in cases.items():
        with pytest.raises(StateFormatError, match=re.escape(message)):
            VcpuState.from_bytes(frame(recs))
    # A record claiming more bytes than there are, behind a valid checksum.
    body = struct.pack("<4sHH", VCPU_MAGIC, FORMAT_VERSION, 0) + struct.pack("<HHI", 4, 0, 1000) + b"x" * 10
    with pytest.raises(StateFormatError, match="claims 1000 bytes where 10 remain"):
        VcpuState.from_bytes(body + struct.pack("<I", zlib.crc32(body)))
    body = struct.pack("<4sHH", VCPU_MAGIC, FORMAT_VERSION, 0) + b"\1\0\0"
    with pytest.raises(StateFormatError, match="ends inside a record header"):
        VcpuState.from_bytes(body + struct.pack("<I", zlib.crc32(body)))


# -- fuzz ----------------------------------------------------------------------------------------
def _decode_or_format_error(data: bytes) -> None:
    for cls in (VcpuState, VmKernelState):
        try:
            cls.from_bytes(data)
        except StateFormatError as exc:
            assert one_sentence(exc), str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    _decode_or_format_error(data)
    _decode_or_format_error(VCPU_MAGIC + data)


_SIZES = [0, 1, 3, 4, 16, 17, 40, 64, 120, 128, 144, 312, 392, 1024, 4096, 4100]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 14), st.integers(0, 3), st.sampled_from(_SIZES),
                          st.binary(min_size=1, max_size=1)), max_size=14),
       st.sampled_from([VCPU_MAGIC, VM_MAGIC]), st.sampled_from([FORMAT_VERSION, 0, 2]))
def test_fuzz_well_framed_records(records, magic, version):
    """Records with a valid checksum: every tag/flags/size combination decodes or is refused."""
    data = frame([(tag, flags, fill * size) for tag, flags, size, fill in records],
                 magic=magic, version=version)
    _decode_or_format_error(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       st.booleans())
def test_fuzz_edited_real_encodings(edits, fix_checksum):
    """A real encoding with a few bytes changed, with or without its checksum put right."""
    data = bytearray(sample_vcpu().to_bytes())
    for pos, value in edits:
        data[pos % (len(data) - 4)] = value
    if fix_checksum:
        struct.pack_into("<I", data, len(data) - 4, zlib.crc32(data[:-4]))
    _decode_or_format_error(bytes(data))
