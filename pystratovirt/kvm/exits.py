"""Decoded KVM_RUN exits: one small value class per exit reason this VMM handles.

:func:`decode_exit` turns the raw ``struct kvm_run`` that KVM filled in into one of the classes
below. IO and MMIO exits keep a reference to the vCPU's shared kvm_run mapping, because their
data lives there: the bytes a guest ``out`` wrote, and the place where the VMM must put the bytes
a guest ``in`` or MMIO read will receive. Such an exit is only valid until the vCPU runs again;
completing an IN / MMIO read means writing into the mapping before the next :meth:`Vcpu.run`.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field

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


# -- port IO ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class _PortIo:
    port: int
    size: int    # bytes per element: 1, 2 or 4
    count: int   # elements (> 1 for rep ins/outs)
    data_offset: int
    _page: memoryview = field(repr=False)

    @property
    def length(self) -> int:
        return self.size * self.count


@dataclass(eq=False)
class IoOut(_PortIo):
    """The guest wrote ``size * count`` bytes to ``port``."""

    @property
    def data(self) -> bytes:
        return bytes(self._page[self.data_offset:self.data_offset + self.length])

    def elements(self) -> list[bytes]:
        """The written bytes split into ``count`` elements of ``size`` bytes."""
        data = self.data
        return [data[i:i + self.size] for i in range(0, len(data), self.size)]


@dataclass(eq=False)
class IoIn(_PortIo):
    """The guest reads ``size * count`` bytes from ``port``; answer with :meth:`complete`."""

    def complete(self, data: bytes) -> None:
        """Hand the guest its bytes; short data is padded with 0xff (an undriven bus)."""
        if len(data) > self.length:
            raise ValueError(f"IN of {self.length} bytes cannot take {len(data)} bytes")
        data = bytes(data) + b"\xff" * (self.length - len(data))
        self._page[self.data_offset:self.data_offset + self.length] = data


# -- MMIO ------------------------------------------------------------------------------------------
_MMIO_DATA_OFFSET = s.kvm_run.mmio.offset + s._run_mmio.data.offset


@dataclass(eq=False)
class MmioWrite:
    """The guest wrote ``data`` (``len`` bytes) at guest physical ``addr``."""

    addr: int
    len: int
    data: bytes


@dataclass(eq=False)
class MmioRead:
    """The guest reads ``len`` bytes at ``addr``; answer with :meth:`complete` before running on."""

    addr: int
    len: int
    _page: memoryview = field(repr=False)

    def complete(self, data: bytes) -> None:
        if len(data) > self.len:
            raise ValueError(f"MMIO read of {self.len} bytes cannot take {len(data)} bytes")
        data = bytes(data) + b"\xff" * (self.len - len(data))
        self._page[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + self.len] = data


# -- everything else -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hlt:
    """The guest executed HLT (only seen without an in-kernel irqchip)."""


@dataclass(frozen=True)
class Shutdown:
    """The guest triple-faulted (or otherwise shut down); x86 treats this as a reset request."""


@dataclass(frozen=True)
class SystemEvent:
    type: SystemEventType | int
    flags: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True)
class InternalError:
    """KVM could not go on; for an emulation failure ``insn_bytes`` may hold the instruction."""

    suberror: InternalSuberror | int
    ndata: int
    data: tuple[int, ...]
    insn_bytes: bytes | None = None  # only with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES

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


@dataclass(frozen=True)
class FailEntry:
    """VM entry failed; ``reason`` is the hardware's entry-failure code."""

    reason: int
    cpu: int


@dataclass(frozen=True)
class Interrupted:
    """KVM_RUN returned early: a signal (EINTR), immediate_exit, or KVM_EXIT_INTR."""


@dataclass(frozen=True)
class Debug:
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True)
class Unknown:
    """Any exit this VMM does not decode; ``hardware_exit_reason`` is valid for KVM_EXIT_UNKNOWN."""

    reason: ExitReason | int
    hardware_exit_reason: int = 0


Exit = (IoIn | IoOut | MmioRead | MmioWrite | Hlt | Shutdown | SystemEvent | InternalError
        | FailEntry | Interrupted | Debug | Unknown)


def decode_exit(run: s.kvm_run, page: memoryview) -> Exit:
    """Decode the exit KVM just reported in ``run``; ``page`` is the whole kvm_run mapping."""
    reason = run.exit_reason
    if reason == ExitReason.IO:
        io = run.io
        if io.data_offset + io.size * io.count > len(page):
            # KVM never does this; if it did, reading past the mapping would be the VMM's bug.
            raise ValueError(f"IO exit data at {io.data_offset:#x} runs past the kvm_run mapping")
        cls = IoOut if io.direction == s.KVM_EXIT_IO_OUT else IoIn
        return cls(io.port, io.size, io.count, io.data_offset, page)
    if reason == ExitReason.MMIO:
        mmio = run.mmio
        length = min(mmio.len, 8)
        if mmio.is_write:
            return MmioWrite(mmio.phys_addr, length, bytes(mmio.data[:length]))
        return MmioRead(mmio.phys_addr, length, page)
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
