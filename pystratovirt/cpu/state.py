"""The guest state KVM holds, as values: :class:`VcpuState` for one vCPU, :class:`VmKernelState`
for the VM's in-kernel PICs, IOAPIC, PIT and kvmclock; how to read them out of KVM, load them into
a new VM in the order KVM needs, and encode them as bytes.

Guest RAM is not part of either; ``pystratovirt.memory`` saves and maps it. A whole VM is
captured while no vCPU runs, and restored into a new VM with the same memory slots, irqchip and
PIT, before any of its vCPUs has run: ``VmKernelState.restore`` first, then each
``VcpuState.restore``, then run.

**Which MSRs.** KVM_GET_MSR_INDEX_LIST is KVM's own list of the MSRs it saves and restores for a
guest or emulates for it. A VcpuState holds every MSR of that list except MSR_KVM_ASYNC_PF_ACK
(writing it acknowledges a delivered async page fault: an action, not state; it reads as 0),
plus the MTRRs when the vCPU's CPUID has the MTRR bit (KVM emulates them without listing them:
MTRRdefType, the 11 fixed-range and 8 variable-range pairs). That covers the syscall/sysenter
MSRs, PAT, TSC and TSC_ADJUST, TSC_DEADLINE, the kvm-clock, async-PF, steal-time and PV-EOI MSRs,
SPEC_CTRL where the host has it, MISC_ENABLE, FEATURE_CONTROL and the host-model MSRs
(ARCH_CAPABILITIES, PERF_CAPABILITIES, PLATFORM_INFO, UCODE_REV: set by the VMM's CPU model, so
restoring them keeps the model). EFER and the APIC base are MSRs too, but KVM_GET/SET_SREGS
carry them. An MSR KVM lists yet refuses to read for this vCPU (a feature its CPUID hides) has
no state, and is left out.

**Restore order**, and why:

1. CPUID: KVM checks later writes (CR4 bits, XCR0, MSRs) against the guest's CPUID.
2. TSC rate, when it differs from the new vCPU's: the TSC MSR's offset is computed at this rate.
3. sregs: the mode (CR0/CR4/EFER), segments, and the APIC base, which decides how KVM reads the
   LAPIC page (xAPIC or x2APIC ids) in step 8. KVM_SET_SREGS also marks a BSP sitting at the reset
   vector runnable, which step 11 overrides.
4. regs: after sregs, and before vcpu_events because KVM_SET_REGS clears a pending exception.
5. XCRs, then the XSAVE area (XCR0 says which state components the guest enabled).
6. debug registers.
7. MSRs, TSC first and async-PF vector before async-PF enable, except TSC_DEADLINE.
8. LAPIC (KVM_SET_LAPIC restarts its timer from the saved current count).
9. TSC_DEADLINE: KVM drops a deadline while the LAPIC timer is not in TSC-deadline mode, and it
   is in guest TSC units, so it needs both the LAPIC (8) and the TSC (7).
10. vcpu_events (pending/injected exception, interrupt, NMI, SMI): after everything above that
    resets them.
11. mp_state last: INIT/SIPI/halted state, over whatever the steps above implied.

**Capture order**: mp_state first (KVM_GET_MP_STATE lets the LAPIC accept pending INIT/SIPI
events, which can change registers; everything after sees the result), vcpu_events last.

**Encoding** (``to_bytes``/``from_bytes``): a header (4-byte magic, u16 format version, u16
flags = 0), then records (u16 tag, u16 flags, u32 length, then that many bytes: the raw kernel
struct, little-endian as on x86_64), then a CRC-32 of everything before it. A record with flag 1
is optional: a reader that does not know its tag skips it, so a later version can add such
records without a version bump; any other unknown record, a different format version, a bad
checksum or a malformed record is a :class:`StateFormatError`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import struct
import time
import typing
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..kvm import structs as s
from ..kvm.structs import CpuidEntry
from ..kvm.vcpu import MsrAccessError
from .cpuid import find
from .regs import LEAF1_EDX_MTRR, MSR_IA32_TSC, MSR_MTRR_DEF_TYPE

if typing.TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import Vm

FORMAT_VERSION = 1

# MSR indices with a part in the choice or the order (the rest are in .regs).
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_ASYNC_PF_INT = 0x4B56_4D06   # restored before MSR_KVM_ASYNC_PF_EN (0x4b564d02)
MSR_KVM_ASYNC_PF_ACK = 0x4B56_4D07
MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MTRR_VARIABLE = tuple(range(0x200, 0x210))  # KVM emulates 8 base/mask pairs

_NOT_STATE = frozenset({MSR_KVM_ASYNC_PF_ACK})
_FIRST = (MSR_IA32_TSC, MSR_KVM_ASYNC_PF_INT)  # restored before the rest, in this order
_MAX_CPUID_ENTRIES = 256  # KVM_MAX_CPUID_ENTRIES
_MAX_MSRS = 4096
_MAX_XSAVE = 1 << 20


class StateFormatError(ValueError):
    """Bytes that are not a saved state this version can read; str() is one sentence saying why."""


class StateRestoreError(OSError):
    """KVM refused part of a saved state (or the host cannot provide it); str() is one sentence
    saying which part of which vCPU, and ``errno`` is KVM's."""

    def __str__(self) -> str:
        return str(self.strerror)


# -- MSR selection -------------------------------------------------------------------------------
def saved_msr_indices(msr_index_list: Iterable[int], cpuid: Iterable[CpuidEntry]) -> list[int]:
    """The MSRs a :class:`VcpuState` holds on this host for a vCPU with this CPUID, in restore
    order (see the module docstring for the choice)."""
    listed = [i for i in dict.fromkeys(msr_index_list) if i not in _NOT_STATE]
    leaf1 = find(cpuid, 1)
    if leaf1 is not None and leaf1.edx & LEAF1_EDX_MTRR:
        listed += [i for i in (MSR_MTRR_DEF_TYPE, *MTRR_FIXED, *MTRR_VARIABLE) if i not in listed]
    first = [i for i in _FIRST if i in listed]
    return first + [i for i in listed if i not in first]


def _read_msrs(vcpu: Vcpu, indices: Sequence[int]) -> list[tuple[int, int]]:
    """Read ``indices``, leaving out those KVM refuses for this vCPU."""
    wanted = list(indices)
    while True:
        try:
            return vcpu.get_msrs(wanted)
        except MsrAccessError as exc:
            wanted.remove(exc.index)


# -- the byte encoding ---------------------------------------------------------------------------
_HEADER = struct.Struct("<4sHH")
_RECORD = struct.Struct("<HHI")
_CRC = struct.Struct("<I")
RECORD_OPTIONAL = 1


def _encode(magic: bytes, records: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytearray(_HEADER.pack(magic, FORMAT_VERSION, 0))
    for tag, payload in records:
        out += _RECORD.pack(tag, 0, len(payload))
        out += payload
    out += _CRC.pack(zlib.crc32(out))
    return bytes(out)


def _decode(what: str, magic: bytes, data: object, names: dict[int, str]) -> dict[int, bytes]:
    """The records of a well-framed encoding, by tag; every framing error is a StateFormatError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateFormatError(f"a saved {what} state is bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) < _HEADER.size + _CRC.size:
        raise StateFormatError(f"the saved {what} state is truncated ({len(raw)} bytes is less "
                               f"than its header and checksum)")
    got_magic, version, flags = _HEADER.unpack_from(raw)
    if got_magic != magic:
        raise StateFormatError(f"these bytes are not a saved {what} state (they start with "
                               f"{got_magic!r}, not {magic!r})")
    (crc,) = _CRC.unpack_from(raw, len(raw) - _CRC.size)
    if zlib.crc32(raw[:-_CRC.size]) != crc:
        raise StateFormatError(f"the saved {what} state is corrupted or truncated (its checksum "
                               f"does not match)")
    if version != FORMAT_VERSION:
        raise StateFormatError(f"the saved {what} state has format version {version}, but this "
                               f"pystratovirt reads version {FORMAT_VERSION}")
    if flags:
        raise StateFormatError(f"the saved {what} state has header flags {flags:#x} this "
                               f"pystratovirt does not know")
    records: dict[int, bytes] = {}
    pos, end = _HEADER.size, len(raw) - _CRC.size
    while pos < end:
        if end - pos < _RECORD.size:
            raise StateFormatError(f"the saved {what} state ends inside a record header at "
                                   f"byte {pos}")
        tag, rflags, length = _RECORD.unpack_from(raw, pos)
        pos += _RECORD.size
        if length > end - pos:
            raise StateFormatError(f"record {tag} of the saved {what} state claims {length} bytes "
                                   f"where {end - pos} remain")
        payload, pos = raw[pos:pos + length], pos + length
        if rflags & ~RECORD_OPTIONAL:
            raise StateFormatError(f"record {tag} of the saved {what} state has flags "
                                   f"{rflags:#x} this pystratovirt does not know")
        if tag not in names:
            if rflags & RECORD_OPTIONAL:
                continue
            raise StateFormatError(f"the saved {what} state has a record this pystratovirt does "
                                   f"not know (tag {tag}); it was written by a newer version")
        if tag in records:
            raise StateFormatError(f"the saved {what} state has its {names[tag]} twice")
        records[tag] = payload
    return records


_S = typing.TypeVar("_S", bound=ctypes.Structure)


class _Reader:
    """Typed access to decoded records; every shape error is a StateFormatError."""

    def __init__(self, what: str, records: dict[int, bytes], names: dict[int, str]):
        self.what = what
        self.records = records
        self.names = names

    def _payload(self, tag: int) -> bytes:
        try:
            return self.records[tag]
        except KeyError:
            raise StateFormatError(f"the saved {self.what} state has no {self.names[tag]}") from None

    def has(self, tag: int) -> bool:
        return tag in self.records

    def struct(self, tag: int, ctype: type[_S]) -> _S:
        payload = self._payload(tag)
        if len(payload) != ctypes.sizeof(ctype):
            raise StateFormatError(f"the {self.names[tag]} record of the saved {self.what} state is "
                                   f"{len(payload)} bytes, not {ctypes.sizeof(ctype)}")
        return ctype.from_buffer_copy(payload)

    def u32(self, tag: int) -> int:
        payload = self._payload(tag)
        if len(payload) != 4:
            raise StateFormatError(f"the {self.names[tag]} record of the saved {self.what} state is "
                                   f"{len(payload)} bytes, not 4")
        value: int = struct.unpack("<I", payload)[0]
        return value

    def array(self, tag: int, item_size: int, limit: int) -> list[bytes]:
        payload = self._payload(tag)
        if len(payload) % item_size or len(payload) // item_size > limit:
            raise StateFormatError(f"the {self.names[tag]} record of the saved {self.what} state is "
                                   f"{len(payload)} bytes, not up to {limit} entries of "
                                   f"{item_size} bytes")
        return [payload[i:i + item_size] for i in range(0, len(payload), item_size)]

    def blob(self, tag: int, minimum: int, maximum: int, multiple: int) -> bytes:
        payload = self._payload(tag)
        if not minimum <= len(payload) <= maximum or len(payload) % multiple:
            raise StateFormatError(f"the {self.names[tag]} record of the saved {self.what} state is "
                                   f"{len(payload)} bytes, not a multiple of {multiple} from "
                                   f"{minimum} to {maximum}")
        return payload


def _restore_step(what: str, vcpu_index: int | None, action: Callable[[], None]) -> None:
    """Run one load ioctl, turning KVM's refusal into a StateRestoreError naming the part."""
    whose = "the VM" if vcpu_index is None else f"vCPU {vcpu_index}"
    try:
        action()
    except MsrAccessError as exc:
        raise StateRestoreError(exc.errno or errno.EINVAL,
                                f"KVM refused the saved {what} of {whose} (MSR {exc.index:#x})") from exc
    except OSError as exc:
        raise StateRestoreError(exc.errno or errno.EINVAL,
                                f"KVM refused the saved {what} of {whose} ({exc.strerror})") from exc


# -- one vCPU ------------------------------------------------------------------------------------
_VCPU_MAGIC = b"PSVc"
_CPUID, _TSC_KHZ, _SREGS, _REGS, _XCRS, _XSAVE, _DEBUGREGS, _MSRS, _LAPIC, _EVENTS, _MP_STATE = range(1, 12)
_VCPU_RECORDS = {
    _CPUID: "CPUID", _TSC_KHZ: "TSC rate", _SREGS: "special registers", _REGS: "registers",
    _XCRS: "XCRs", _XSAVE: "XSAVE area", _DEBUGREGS: "debug registers", _MSRS: "MSRs",
    _LAPIC: "LAPIC", _EVENTS: "pending events", _MP_STATE: "MP state",
}
_MSR_ENTRY = struct.Struct("<IIQ")  # struct kvm_msr_entry


@dataclass(frozen=True, eq=False)
class VcpuState:
    """Everything KVM holds for one vCPU. The ctypes members are copies owned by this value:
    treat them as read-only. Two states are equal when their encodings are."""

    cpuid: tuple[CpuidEntry, ...]
    tsc_khz: int
    sregs: s.kvm_sregs
    regs: s.kvm_regs
    xcrs: s.kvm_xcrs
    xsave: bytes
    debugregs: s.kvm_debugregs
    msrs: tuple[tuple[int, int], ...]  # (index, value), in restore order
    lapic: s.kvm_lapic_state | None    # None: the VM has no in-kernel irqchip
    events: s.kvm_vcpu_events
    mp_state: int

    @classmethod
    def capture(cls, vcpu: Vcpu, msr_index_list: Iterable[int]) -> VcpuState:
        """Read the state of ``vcpu``; ``msr_index_list`` is KVM_GET_MSR_INDEX_LIST of /dev/kvm.

        The vCPU must be outside KVM_RUN with its last exit completed. KVM finishes a port-IO or
        MMIO exit (and moves RIP past the instruction) only when KVM_RUN is entered again, so
        re-enter it once with ``immediate_exit`` set (it returns Interrupted at once) before
        capturing; the machine's pause does exactly that. State read before would replay the
        instruction on restore.
        """
        mp_state = vcpu.get_mp_state()
        cpuid = tuple(vcpu.get_cpuid2())
        tsc_khz = vcpu.get_tsc_khz()
        sregs = vcpu.get_sregs()
        regs = vcpu.get_regs()
        xcrs = vcpu.get_xcrs()
        xsave = bytes(vcpu.get_xsave_area())
        debugregs = vcpu.get_debugregs()
        msrs = tuple(_read_msrs(vcpu, saved_msr_indices(msr_index_list, cpuid)))
        try:
            lapic: s.kvm_lapic_state | None = vcpu.get_lapic()
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # KVM_GET_LAPIC's only EINVAL: no in-kernel LAPIC
                raise
            lapic = None
        events = vcpu.get_vcpu_events()
        return cls(cpuid, tsc_khz, sregs, regs, xcrs, xsave, debugregs, msrs, lapic, events, mp_state)

    def restore(self, vcpu: Vcpu) -> None:
        """Load this state into ``vcpu``, a vCPU of a new VM that has not run yet, in the order
        of the module docstring. Raises :class:`StateRestoreError` naming the part KVM refused."""
        i = vcpu.index
        _restore_step("CPUID", i, lambda: vcpu.set_cpuid2(self.cpuid))
        self._restore_tsc_khz(vcpu)
        _restore_step("special registers", i, lambda: vcpu.set_sregs(self.sregs))
        _restore_step("registers", i, lambda: vcpu.set_regs(self.regs))
        _restore_step("XCRs", i, lambda: vcpu.set_xcrs(self.xcrs))
        xsave = self._xsave_for(vcpu)
        _restore_step("XSAVE area", i, lambda: vcpu.set_xsave(xsave))
        _restore_step("debug registers", i, lambda: vcpu.set_debugregs(self.debugregs))
        early = [(index, value) for index, value in self.msrs if index != MSR_IA32_TSC_DEADLINE]
        late = [(index, value) for index, value in self.msrs if index == MSR_IA32_TSC_DEADLINE]
        _restore_step("MSRs", i, lambda: vcpu.set_msrs(early))
        if self.lapic is not None:
            lapic = self.lapic
            _restore_step("LAPIC", i, lambda: vcpu.set_lapic(lapic))
        _restore_step("TSC deadline", i, lambda: vcpu.set_msrs(late))
        _restore_step("pending events", i, lambda: vcpu.set_vcpu_events(self.events))
        _restore_step("MP state", i, lambda: vcpu.set_mp_state(self.mp_state))

    def _restore_tsc_khz(self, vcpu: Vcpu) -> None:
        current = vcpu.get_tsc_khz()
        if current == self.tsc_khz:
            return
        try:
            vcpu.set_tsc_khz(self.tsc_khz)
        except OSError as exc:
            raise StateRestoreError(exc.errno or errno.EINVAL,
                                    f"vCPU {vcpu.index} cannot run its saved TSC at "
                                    f"{self.tsc_khz} kHz on this host, whose KVM runs it at "
                                    f"{current} kHz ({exc.strerror})") from exc

    def _xsave_for(self, vcpu: Vcpu) -> ctypes.Structure:
        """The saved XSAVE area sized for ``vcpu``: zero-padded when this host's area is larger
        (the extra components stay in their initial state), refused when the saved area holds
        state beyond what this host can load."""
        size = vcpu.xsave_size
        if len(self.xsave) > size and any(self.xsave[size:]):
            raise StateRestoreError(errno.EINVAL,
                                    f"the saved XSAVE area of vCPU {vcpu.index} holds "
                                    f"{len(self.xsave)} bytes of state, but this host's KVM "
                                    f"loads only {size}")
        area = s.kvm_xsave_with(size)
        data = self.xsave[:size]
        ctypes.memmove(ctypes.addressof(area), data, len(data))
        return area

    # -- bytes -----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        records = [
            (_CPUID, b"".join(bytes(e.to_c()) for e in self.cpuid)),
            (_TSC_KHZ, struct.pack("<I", self.tsc_khz)),
            (_SREGS, bytes(self.sregs)),
            (_REGS, bytes(self.regs)),
            (_XCRS, bytes(self.xcrs)),
            (_XSAVE, self.xsave),
            (_DEBUGREGS, bytes(self.debugregs)),
            (_MSRS, b"".join(_MSR_ENTRY.pack(index, 0, value) for index, value in self.msrs)),
            (_EVENTS, bytes(self.events)),
            (_MP_STATE, struct.pack("<I", self.mp_state)),
        ]
        if self.lapic is not None:
            records.append((_LAPIC, bytes(self.lapic)))
        return _encode(_VCPU_MAGIC, records)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> VcpuState:
        """Decode :meth:`to_bytes`'s output; anything else raises :class:`StateFormatError`."""
        r = _Reader("vCPU", _decode("vCPU", _VCPU_MAGIC, data, _VCPU_RECORDS), _VCPU_RECORDS)
        entry_size = ctypes.sizeof(s.kvm_cpuid_entry2)
        cpuid = tuple(CpuidEntry.from_c(s.kvm_cpuid_entry2.from_buffer_copy(raw))
                      for raw in r.array(_CPUID, entry_size, _MAX_CPUID_ENTRIES))
        msrs = []
        for raw in r.array(_MSRS, _MSR_ENTRY.size, _MAX_MSRS):
            index, _reserved, value = _MSR_ENTRY.unpack(raw)
            msrs.append((index, value))
        return cls(
            cpuid=cpuid,
            tsc_khz=r.u32(_TSC_KHZ),
            sregs=r.struct(_SREGS, s.kvm_sregs),
            regs=r.struct(_REGS, s.kvm_regs),
            xcrs=r.struct(_XCRS, s.kvm_xcrs),
            xsave=r.blob(_XSAVE, s.KVM_XSAVE_SIZE, _MAX_XSAVE, 4),
            debugregs=r.struct(_DEBUGREGS, s.kvm_debugregs),
            msrs=tuple(msrs),
            lapic=r.struct(_LAPIC, s.kvm_lapic_state) if r.has(_LAPIC) else None,
            events=r.struct(_EVENTS, s.kvm_vcpu_events),
            mp_state=r.u32(_MP_STATE),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VcpuState):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())


# -- the VM's in-kernel devices ------------------------------------------------------------------
_VM_MAGIC = b"PSVm"
_PIC_MASTER, _PIC_SLAVE, _IOAPIC, _PIT, _CLOCK = range(1, 6)
_VM_RECORDS = {_PIC_MASTER: "master PIC", _PIC_SLAVE: "slave PIC", _IOAPIC: "IOAPIC",
               _PIT: "PIT", _CLOCK: "kvmclock"}


@dataclass(frozen=True, eq=False)
class VmKernelState:
    """The state of a VM's in-kernel devices: both i8259 PICs, the IOAPIC, the i8254 PIT and the
    kvmclock. The ctypes members are copies owned by this value: treat them as read-only."""

    pic_master: s.kvm_pic_state
    pic_slave: s.kvm_pic_state
    ioapic: s.kvm_ioapic_state
    pit: s.kvm_pit_state2
    clock: s.kvm_clock_data  # always paired with host realtime (KVM_CLOCK_REALTIME set)

    @classmethod
    def capture(cls, vm: Vm) -> VmKernelState:
        """Read the state of ``vm``'s in-kernel irqchip, PIT and clock (no vCPU may run).

        KVM pairs the kvmclock with the host's realtime only while it runs a TSC-based master
        clock; otherwise the host realtime is read here, right after it, so that
        ``restore(advance_clock=True)`` always has a starting point.
        """
        pic_master = vm.get_irqchip(s.KVM_IRQCHIP_PIC_MASTER).chip.pic
        pic_slave = vm.get_irqchip(s.KVM_IRQCHIP_PIC_SLAVE).chip.pic
        ioapic = vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC).chip.ioapic
        pit = vm.get_pit2()
        clock = vm.get_clock()
        if not clock.flags & s.KVM_CLOCK_REALTIME:
            clock.realtime = time.clock_gettime_ns(time.CLOCK_REALTIME)
            clock.flags |= s.KVM_CLOCK_REALTIME
        return cls(_copy(pic_master), _copy(pic_slave), _copy(ioapic), pit, clock)

    def restore(self, vm: Vm, *, advance_clock: bool = False) -> None:
        """Load this state into ``vm`` (a new VM with an irqchip and a PIT, before its vCPUs run).

        The kvmclock resumes at the saved value, as if the VM had been paused in between; with
        ``advance_clock`` it also counts the host realtime that has passed since the capture
        (for a restore on the same host, or hosts with synchronised clocks). The PIT reloads
        each channel's count as of now (KVM_SET_PIT2 does), so the period that was running when
        the state was captured starts over.
        """
        for chip_id, what, pic in ((s.KVM_IRQCHIP_PIC_MASTER, "master PIC", self.pic_master),
                                   (s.KVM_IRQCHIP_PIC_SLAVE, "slave PIC", self.pic_slave)):
            chip = s.kvm_irqchip(chip_id=chip_id)
            chip.chip.pic = pic
            _restore_step(what, None, functools.partial(vm.set_irqchip, chip))
        chip = s.kvm_irqchip(chip_id=s.KVM_IRQCHIP_IOAPIC)
        chip.chip.ioapic = self.ioapic
        _restore_step("IOAPIC", None, lambda: vm.set_irqchip(chip))
        _restore_step("PIT", None, lambda: vm.set_pit2(self.pit))
        clock = s.kvm_clock_data(clock=self.clock.clock)
        if advance_clock:
            clock.flags = s.KVM_CLOCK_REALTIME
            clock.realtime = self.clock.realtime
        _restore_step("kvmclock", None, lambda: vm.set_clock(clock))

    def to_bytes(self) -> bytes:
        return _encode(_VM_MAGIC, [
            (_PIC_MASTER, bytes(self.pic_master)),
            (_PIC_SLAVE, bytes(self.pic_slave)),
            (_IOAPIC, bytes(self.ioapic)),
            (_PIT, bytes(self.pit)),
            (_CLOCK, bytes(self.clock)),
        ])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> VmKernelState:
        """Decode :meth:`to_bytes`'s output; anything else raises :class:`StateFormatError`."""
        r = _Reader("VM", _decode("VM", _VM_MAGIC, data, _VM_RECORDS), _VM_RECORDS)
        return cls(
            pic_master=r.struct(_PIC_MASTER, s.kvm_pic_state),
            pic_slave=r.struct(_PIC_SLAVE, s.kvm_pic_state),
            ioapic=r.struct(_IOAPIC, s.kvm_ioapic_state),
            pit=r.struct(_PIT, s.kvm_pit_state2),
            clock=r.struct(_CLOCK, s.kvm_clock_data),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VmKernelState):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())


def _copy(value: _S) -> _S:
    """A standalone copy of a ctypes struct (one read from inside a union shares its buffer)."""
    return type(value).from_buffer_copy(value)
