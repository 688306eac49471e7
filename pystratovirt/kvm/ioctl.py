"""KVM ioctl request numbers, capability numbers, and the one place that calls ioctl(2).

The request numbers are computed the way <asm-generic/ioctl.h> computes them (direction, size,
type and number packed into 32 bits) from the ctypes mirrors in :mod:`.structs`, so a struct that
drifts from the kernel's shows up as a wrong request number as well as a wrong size in the tests.

:func:`ioctl` goes through libc with ctypes rather than :func:`fcntl.ioctl`: a ctypes foreign call
releases the GIL for its duration, which KVM_RUN needs (a vCPU thread sits in it for as long as
the guest runs), and it reports EINTR instead of retrying, which the vCPU kick relies on.
"""

from __future__ import annotations

import ctypes
import enum
import errno as _errno
import os
import typing

from ..util.libc import LIBC
from . import structs as s

# -- <asm-generic/ioctl.h> -------------------------------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


if typing.TYPE_CHECKING:
    # A byte count, or the ctypes type whose size the request encodes.
    _Size = int | type[ctypes._CData]


def _size_of(size: _Size) -> int:
    """The C macros take a type; accept a ctypes type or a plain byte count."""
    return size if isinstance(size, int) else ctypes.sizeof(size)


def _IOC(direction: int, type_: int, nr: int, size_or_type: _Size) -> int:
    size = _size_of(size_or_type)
    if not 0 <= direction < (1 << _IOC_DIRBITS):
        raise ValueError(f"ioctl direction {direction} out of range")
    if not 0 <= type_ < (1 << _IOC_TYPEBITS) or not 0 <= nr < (1 << _IOC_NRBITS):
        raise ValueError(f"ioctl type {type_:#x} / nr {nr:#x} out of range")
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: _Size) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: _Size) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: _Size) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


# -- <linux/kvm.h> request numbers -----------------------------------------------------------------
KVMIO = 0xAE

# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, s.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)  # also valid on a VM fd
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, s.kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, s.kvm_msr_list)

# VM fd
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, s.kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, s.kvm_irqchip)  # (sic) _IOR in the header, kept for the ABI
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, s.kvm_irq_level)
KVM_IRQFD = _IOW(KVMIO, 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, s.kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, s.kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, s.kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, s.kvm_pit_state2)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, s.kvm_enable_cap)  # VM fd, and vCPU fd for vCPU caps

# vCPU fd
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, s.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, s.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, s.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, s.kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, s.kvm_translation)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, s.kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, s.kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, s.kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, s.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, s.kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, s.kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)  # also on a VM fd (KVM_CAP_VM_TSC_CONTROL): the default
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, s.kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, s.kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, s.kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, s.kvm_xcrs)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, s.kvm_xsave)  # the size field says 4096 whatever KVM moves

KVM_API_VERSION = 12


class Cap(enum.IntEnum):
    """The KVM_CAP_* numbers this VMM asks about (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    IRQ_INJECT_STATUS = 26
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    KVMCLOCK_CTRL = 76
    READONLY_MEM = 81
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    EXCEPTION_PAYLOAD = 164
    EXIT_ON_EMULATION_FAILURE = 204
    XSAVE2 = 208
    VM_TSC_CONTROL = 214


# -- the system call -------------------------------------------------------------------------------
# A prototype bound to libc's ioctl with fixed argument types: the request is an unsigned long in
# the kernel ABI, and the third argument is either a pointer or a small integer, both of which
# travel as a pointer-sized value on x86_64. use_errno makes ctypes capture errno per call (and
# per thread), so concurrent vCPU threads never see each other's errors.
_LIBC = LIBC
_ioctl = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                          use_errno=True)(("ioctl", _LIBC))


#: The prototype itself, for the one caller on a hot path (KVM_RUN, once per guest exit): returns
#: the raw result, -1 with ``ctypes.get_errno()`` on failure, and takes None, an int or a ctypes
#: pointer (``ctypes.byref``) as its third argument.
ioctl_raw = _ioctl


def ioctl(fd: int, request: int, arg: int | ctypes._CData | None = None) -> int:
    """Issue ``ioctl(fd, request, arg)`` and return its non-negative result, or raise OSError.

    ``arg`` is None (0), an int passed by value, or a ctypes object passed by address (the kernel
    reads and/or writes it in place). EINTR is raised as :class:`InterruptedError`, never retried.
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret: int = _ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)} (ioctl {request:#x})")
    return ret


def is_eintr(exc: OSError) -> bool:
    """Whether an ioctl failure was a signal interrupting it."""
    return exc.errno == _errno.EINTR
