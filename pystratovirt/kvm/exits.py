"""Decoded KVM_RUN exits: one small value class per exit reason this VMM handles.

:func:`decode_exit` turns the raw ``struct kvm_run`` that KVM filled in into one of the classes
below. IO and MMIO exits keep a reference to the vCPU's shared kvm_run mapping, because their
data lives there: the bytes a guest ``out`` wrote, and the place where the VMM must put the bytes
a guest ``in`` or MMIO read will receive. Such an exit is only valid until the vCPU runs again;
completing an IN / MMIO read means writing into the mapping before the next :meth:`Vcpu.run`.
"""

from __future__ import annotations

import enum
import struct
import typing

from . import structs as s


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* from <linux/kvm.h>."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37


class InternalSuberror(enum.IntEnum):
    """KVM_INTERNAL_ERROR_* (the ``suberror`` of a KVM_EXIT_INTERNAL_ERROR)."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEventType(enum.IntEnum):
    """KVM_SYSTEM_EVENT_* (the ``type`` of a KVM_EXIT_SYSTEM_EVENT)."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


_E = typing.TypeVar("_E", bound=enum.IntEnum)


def _enum_or_int(enum_type: type[_E], value: int) -> _E | int:
    try:
        return enum_type(value)
    except ValueError:
        return value


class _Exit:
    """What every decoded exit shares: equality by kind and fields, a readable repr.

    Plain classes with slots rather than dataclasses: a vCPU thread builds one per guest exit
    (hundreds of thousands in a Linux boot), and a dataclass costs more to build, both here and
    when the module is imported at start-up. ``_fields`` lists what equality and repr show.
    """

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    def __hash__(self) -> int:
        return hash((type(self), *(getattr(self, f) for f in self._fields)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self._fields)})"


# -- port IO ---------------------------------------------------------------------------------------
class _PortIo(_Exit):
    __slots__ = ("port", "size", "count", "data_offset", "_page")
    _fields = ("port", "size", "count", "data_offset")

    def __init__(self, port: int, size: int, count: int, data_offset: int, page: memoryview):
        self.port = port
        self.size = size          # bytes per element: 1, 2 or 4
        self.count = count        # elements (> 1 for rep ins/outs)
        self.data_offset = data_offset
        self._page = page

    @property
    def length(self) -> int:
        return self.size * self.count


class IoOut(_PortIo):
    """The guest wrote ``size * count`` bytes to ``port``."""

    __slots__ = ()

    @property
    def data(self) -> bytes:
        return bytes(self._page[self.data_offset:self.data_offset + self.length])

    def elements(self) -> list[bytes]:
        """The written bytes split into ``count`` elements of ``size`` bytes."""
        data = self.data
        return [data[i:i + self.size] for i in range(0, len(data), self.size)]


class IoIn(_PortIo):
    """The guest reads ``size * count`` bytes from ``port``; answer with :meth:`complete`."""

    __slots__ = ()

    def complete(self, data: bytes) -> None:
        """Hand the guest its bytes; short data is padded with 0xff (an undriven bus)."""
        if len(data) > self.length:
            raise ValueError(f"IN of {self.length} bytes cannot take {len(data)} bytes")
        data = bytes(data) + b"\xff" * (self.length - len(data))
        self._page[self.data_offset:self.data_offset + self.length] = data


# -- MMIO ------------------------------------------------------------------------------------------
_MMIO_DATA_OFFSET = s.kvm_run.mmio.offset + s._run_mmio.data.offset


class MmioWrite(_Exit):
    """The guest wrote ``data`` (``len`` bytes) at guest physical ``addr``."""

    __slots__ = ("addr", "len", "data")
    _fields = __slots__

    def __init__(self, addr: int, len: int, data: bytes):
        self.addr, self.len, self.data = addr, len, data


class MmioRead(_Exit):
    """The guest reads ``len`` bytes at ``addr``; answer with :meth:`complete` before running on."""

    __slots__ = ("addr", "len", "_page")
    _fields = ("addr", "len")

    def __init__(self, addr: int, len: int, page: memoryview):
        self.addr, self.len, self._page = addr, len, page

    def complete(self, data: bytes) -> None:
        if len(data) > self.len:
            raise ValueError(f"MMIO read of {self.len} bytes cannot take {len(data)} bytes")
        data = bytes(data) + b"\xff" * (self.len - len(data))
        self._page[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + self.len] = data


# -- everything else -------------------------------------------------------------------------------
class Hlt(_Exit):
    """The guest executed HLT (only seen without an in-kernel irqchip)."""

    __slots__ = ()


class Shutdown(_Exit):
    """The guest triple-faulted (or otherwise shut down); x86 treats this as a reset request."""

    __slots__ = ()


class SystemEvent(_Exit):
    __slots__ = ("type", "flags", "data")
    _fields = __slots__

    def __init__(self, type: SystemEventType | int, flags: int, data: tuple[int, ...] = ()):
        self.type, self.flags, self.data = type, flags, data


class InternalError(_Exit):
    """KVM could not go on; for an emulation failure ``insn_bytes`` may hold the instruction."""

    __slots__ = ("suberror", "ndata", "data", "insn_bytes")
    _fields = __slots__

    def __init__(self, suberror: InternalSuberror | int, ndata: int, data: tuple[int, ...],
                 insn_bytes: bytes | None = None):
        self.suberror, self.ndata, self.data = suberror, ndata, data
        self.insn_bytes = insn_bytes  # only with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES

    @property
    def is_emulation_failure(self) -> bool:
        return self.suberror == InternalSuberror.EMULATION

    def describe(self) -> str:
        name = self.suberror.name if isinstance(self.suberror, InternalSuberror) else str(self.suberror)
        text = f"KVM internal error {name}"
        if self.insn_bytes is not None:
            text += f", instruction bytes {self.insn_bytes.hex(' ')}"
        if self.data:
            text += ", data " + " ".join(f"{d:#x}" for d in self.data)
        return text


class FailEntry(_Exit):
    """VM entry failed; ``reason`` is the hardware's entry-failure code."""

    __slots__ = ("reason", "cpu")
    _fields = __slots__

    def __init__(self, reason: int, cpu: int):
        self.reason, self.cpu = reason, cpu


class Interrupted(_Exit):
    """KVM_RUN returned early: a signal (EINTR), immediate_exit, or KVM_EXIT_INTR."""

    __slots__ = ()


class Debug(_Exit):
    __slots__ = ("exception", "pc", "dr6", "dr7")
    _fields = __slots__

    def __init__(self, exception: int, pc: int, dr6: int, dr7: int):
        self.exception, self.pc, self.dr6, self.dr7 = exception, pc, dr6, dr7


class Unknown(_Exit):
    """Any exit this VMM does not decode; ``hardware_exit_reason`` is valid for KVM_EXIT_UNKNOWN."""

    __slots__ = ("reason", "hardware_exit_reason")
    _fields = __slots__

    def __init__(self, reason: ExitReason | int, hardware_exit_reason: int = 0):
        self.reason, self.hardware_exit_reason = reason, hardware_exit_reason


Exit = (IoIn | IoOut | MmioRead | MmioWrite | Hlt | Shutdown | SystemEvent | InternalError
        | FailEntry | Interrupted | Debug | Unknown)


# The two exits a guest makes all the time are read straight from the page with struct (one call
# each) rather than field by field through ctypes: exit_reason, then struct kvm_run's union.
_EXIT_REASON = struct.Struct("=I")
_EXIT_REASON_OFFSET = s.kvm_run.exit_reason.offset
_IO = struct.Struct("=BBHIQ")              # direction, size, port, count, data_offset
_IO_OFFSET = s.kvm_run.io.offset
_MMIO = struct.Struct("=Q8sIB")            # phys_addr, data, len, is_write
_MMIO_OFFSET = s.kvm_run.mmio.offset
_EXIT_IO, _EXIT_MMIO = int(ExitReason.IO), int(ExitReason.MMIO)


def decode_exit(run: s.kvm_run, page: memoryview) -> Exit:
    """Decode the exit KVM just reported in ``run``; ``page`` is the whole kvm_run mapping."""
    reason = _EXIT_REASON.unpack_from(page, _EXIT_REASON_OFFSET)[0]
    if reason == _EXIT_IO:
        direction, size, port, count, data_offset = _IO.unpack_from(page, _IO_OFFSET)
        if data_offset + size * count > len(page):
            # KVM never does this; if it did, reading past the mapping would be the VMM's bug.
            raise ValueError(f"IO exit data at {data_offset:#x} runs past the kvm_run mapping")
        cls = IoOut if direction == s.KVM_EXIT_IO_OUT else IoIn
        return cls(port, size, count, data_offset, page)
    if reason == _EXIT_MMIO:
        addr, data, length, is_write = _MMIO.unpack_from(page, _MMIO_OFFSET)
        length = min(length, 8)
        if is_write:
            return MmioWrite(addr, length, data[:length])
        return MmioRead(addr, length, page)
    if reason == ExitReason.HLT:
        return Hlt()
    if reason == ExitReason.SHUTDOWN:
        return Shutdown()
    if reason == ExitReason.INTR:
        return Interrupted()
    if reason == ExitReason.SYSTEM_EVENT:
        ev = run.system_event
        ndata = min(ev.ndata, 16)
        return SystemEvent(_enum_or_int(SystemEventType, ev.type), ev.flags, tuple(ev.data[:ndata]))
    if reason == ExitReason.INTERNAL_ERROR:
        internal = run.internal
        ndata = min(internal.ndata, 16)
        insn = None
        if internal.suberror == InternalSuberror.EMULATION and ndata >= 3:
            ef = run.emulation_failure
            if ef.flags & s.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                insn = bytes(ef.insn_bytes[:min(ef.insn_size, 15)])
        return InternalError(_enum_or_int(InternalSuberror, internal.suberror), internal.ndata,
                             tuple(internal.data[:ndata]), insn)
    if reason == ExitReason.FAIL_ENTRY:
        fe = run.fail_entry
        return FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
    if reason == ExitReason.DEBUG:
        arch = run.debug.arch
        return Debug(arch.exception, arch.pc, arch.dr6, arch.dr7)
    return Unknown(_enum_or_int(ExitReason, reason),
                   run.hw.hardware_exit_reason if reason == ExitReason.UNKNOWN else 0)
