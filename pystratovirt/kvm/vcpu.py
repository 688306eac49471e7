"""One KVM vCPU: its fd, the shared kvm_run page, its state (registers, FPU/XSAVE, XCRs, debug
registers, MSRs, CPUID, LAPIC, events, MP state, TSC rate), and KVM_RUN.

Every state method is one ioctl and raises OSError when KVM refuses; what makes up the complete
saved state of a vCPU, and the order it must be loaded in, is ``pystratovirt.cpu.state``'s
business. A vCPU knows nothing of its VM: :meth:`~.vm.Vm.create_vcpu` hands it the values it
needs.

Kicking a vCPU out of KVM_RUN from another thread (to pause it, stop it, or make it look at a
request) works like this:

1. :meth:`Vcpu.kick` sets ``kvm_run.immediate_exit`` and, if the vCPU thread is inside
   :meth:`Vcpu.run`, sends that thread SIGUSR1 with :func:`signal.pthread_kill`.
2. A vCPU thread already in KVM_RUN is pulled out by the signal (KVM_RUN fails with EINTR); one
   that is just about to enter it sees ``immediate_exit`` and returns at once. Either way
   :meth:`Vcpu.run` returns :class:`~.exits.Interrupted`. Nothing is lost if the kick lands while
   the vCPU thread is busy handling another exit: ``immediate_exit`` stays set until the thread
   acknowledges it, so the next run returns Interrupted straight away.
3. The vCPU thread acknowledges with :meth:`Vcpu.ack_kick` *before* it looks at whatever the
   kicker wanted (a request flag, a queue), then acts and runs again.

The signal needs a handler, or SIGUSR1's default action would kill the process: call
:func:`install_kick_signal` once, from the main thread, before starting vCPU threads. The handler
does nothing; the signal's only job is to interrupt the system call.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import threading
import types
import typing
from dataclasses import dataclass
from time import perf_counter_ns

from . import ioctl as k
from . import structs as s
from .exits import Exit, Interrupted, decode_exit
from .ioctl import ioctl_raw as _run_ioctl
from .structs import CpuidEntry

KICK_SIGNAL = signal.SIGUSR1


def _ignore_kick(signum: int, frame: types.FrameType | None) -> None:
    """The kick signal's handler: nothing to do, the interrupted KVM_RUN is the point."""


def install_kick_signal() -> None:
    """Install the no-op SIGUSR1 handler vCPU kicks rely on; must run in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_kick_signal() must be called from the main thread")
    signal.signal(KICK_SIGNAL, _ignore_kick)
    # Python asks for interrupted system calls anyway; make it explicit that KVM_RUN must see
    # EINTR rather than be restarted.
    signal.siginterrupt(KICK_SIGNAL, True)


class MsrAccessError(OSError):
    """KVM refused to read or write one MSR of a batch; ``index`` says which."""

    def __init__(self, errno_: int, message: str, *, index: int):
        super().__init__(errno_, message)
        self.index = index


@dataclass(frozen=True)
class Translation:
    """The answer of KVM_TRANSLATE for one guest virtual address."""

    linear_address: int
    physical_address: int
    valid: bool
    writeable: bool
    usermode: bool


class Vcpu:
    """A vCPU fd plus its mmap'ed kvm_run. Create it with :meth:`Vm.create_vcpu`.

    Only the thread that calls :meth:`run` should touch the register state while the vCPU can
    run; :meth:`kick` and :attr:`immediate_exit` are safe from any thread.
    """

    def __init__(self, index: int, fd: int, mmap_size: int, *, xsave2_size: int = 0):
        self.index = index
        self.fd = fd
        # KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM when this vCPU was made: 0 when the host
        # has no KVM_GET_XSAVE2, else the bytes it and KVM_SET_XSAVE move (at least 4096).
        self.xsave2_size = xsave2_size
        self._map: mmap.mmap | None = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                                mmap.PROT_READ | mmap.PROT_WRITE)
        self._run = s.kvm_run.from_buffer(self._map)
        self._page = memoryview(self._map)
        self._kick_lock = threading.Lock()
        self._in_run = False
        self._thread_ident: int | None = None
        self.thread_id: int | None = None  # native (kernel) id of the thread that last ran it
        self.left_guest_ns = 0  # time.perf_counter_ns() when KVM_RUN last returned

    # -- running -------------------------------------------------------------------------------
    @property
    def kvm_run(self) -> s.kvm_run:
        """The raw shared kvm_run structure (for fields the decoded exits do not cover)."""
        return self._run

    def run(self) -> Exit:
        """Enter the guest until the next exit and return it decoded.

        A decoded IO/MMIO exit refers to the kvm_run page and is valid only until the next run.
        """
        ident = threading.get_ident()
        with self._kick_lock:
            if ident != self._thread_ident:
                # get_native_id() is a system call: only when another thread starts running it.
                self._thread_ident = ident
                self.thread_id = threading.get_native_id()
            self._in_run = True
        try:
            if _run_ioctl(self.fd, k.KVM_RUN, None) < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN):  # a kick; or KVM asks to be called again
                    return Interrupted()
                raise OSError(err, f"{os.strerror(err)} (ioctl KVM_RUN)")
        finally:
            with self._kick_lock:
                self._in_run = False
            self.left_guest_ns = perf_counter_ns()
        return decode_exit(self._run, self._page)

    @property
    def immediate_exit(self) -> bool:
        return bool(self._run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._run.immediate_exit = 1 if value else 0

    def kick(self) -> None:
        """Make the vCPU thread return from :meth:`run` soon; callable from any thread."""
        self._run.immediate_exit = 1
        # The lock keeps the thread from leaving run() (and perhaps exiting) between the check and
        # the signal, so the signal never targets a thread that is gone.
        with self._kick_lock:
            if self._in_run and self._thread_ident is not None:
                signal.pthread_kill(self._thread_ident, KICK_SIGNAL)

    def ack_kick(self) -> None:
        """Clear ``immediate_exit``; do this before looking at why the vCPU was kicked."""
        self._run.immediate_exit = 0

    # -- registers -----------------------------------------------------------------------------
    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        k.ioctl(self.fd, k.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        k.ioctl(self.fd, k.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        k.ioctl(self.fd, k.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        k.ioctl(self.fd, k.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        k.ioctl(self.fd, k.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        k.ioctl(self.fd, k.KVM_SET_FPU, fpu)

    # -- XSAVE area, XCRs, debug registers -----------------------------------------------------
    @property
    def xsave_size(self) -> int:
        """Bytes of XSAVE area KVM_SET_XSAVE reads from its argument on this vCPU."""
        return max(self.xsave2_size, s.KVM_XSAVE_SIZE)

    def get_xsave(self) -> s.kvm_xsave:
        """The 4096-byte XSAVE area (KVM_GET_XSAVE); KVM refuses once the area is larger."""
        xs = s.kvm_xsave()
        k.ioctl(self.fd, k.KVM_GET_XSAVE, xs)
        return xs

    def get_xsave2(self) -> ctypes.Structure:
        """The whole XSAVE area, :attr:`xsave_size` bytes (KVM_GET_XSAVE2; needs KVM_CAP_XSAVE2)."""
        if not self.xsave2_size:
            raise OSError(errno.ENOTTY, "this host's KVM has no KVM_GET_XSAVE2 (KVM_CAP_XSAVE2)")
        xs = s.kvm_xsave_with(self.xsave2_size)
        k.ioctl(self.fd, k.KVM_GET_XSAVE2, xs)
        return xs

    def get_xsave_area(self) -> ctypes.Structure:
        """The whole XSAVE area with the ioctl this host has: KVM_GET_XSAVE2, else KVM_GET_XSAVE."""
        return self.get_xsave2() if self.xsave2_size else self.get_xsave()

    def set_xsave(self, xsave: ctypes.Structure) -> None:
        """Load an XSAVE area (KVM_SET_XSAVE). KVM reads :attr:`xsave_size` bytes from it, so a
        shorter buffer is refused here rather than letting the kernel read past its end."""
        if ctypes.sizeof(xsave) < self.xsave_size:
            raise ValueError(f"an XSAVE area of {ctypes.sizeof(xsave)} bytes is shorter than the "
                             f"{self.xsave_size} bytes KVM_SET_XSAVE reads on this host")
        k.ioctl(self.fd, k.KVM_SET_XSAVE, xsave)

    def get_mxcsr(self) -> int:
        """MXCSR, read through the XSAVE area (KVM_GET_FPU does not report it)."""
        value: int = self.get_xsave_area().region[s.XSAVE_MXCSR_INDEX]
        return value

    def set_mxcsr(self, value: int) -> None:
        """Set MXCSR through the XSAVE area (KVM_SET_FPU ignores its mxcsr field)."""
        xs = self.get_xsave_area()
        xs.region[s.XSAVE_MXCSR_INDEX] = value & 0xFFFF_FFFF
        self.set_xsave(xs)

    def get_xcrs(self) -> s.kvm_xcrs:
        """The extended control registers (XCR0) (KVM_GET_XCRS)."""
        xcrs = s.kvm_xcrs()
        k.ioctl(self.fd, k.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        """KVM_SET_XCRS; KVM checks XCR0 against the features the vCPU's CPUID offers."""
        k.ioctl(self.fd, k.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> s.kvm_debugregs:
        """DR0-DR3, DR6 and DR7 (KVM_GET_DEBUGREGS)."""
        regs = s.kvm_debugregs()
        k.ioctl(self.fd, k.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs: s.kvm_debugregs) -> None:
        k.ioctl(self.fd, k.KVM_SET_DEBUGREGS, regs)

    # -- TSC rate, kvmclock ----------------------------------------------------------------------
    def get_tsc_khz(self) -> int:
        """The guest TSC's frequency in kHz (KVM_GET_TSC_KHZ)."""
        return k.ioctl(self.fd, k.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """Run the guest TSC at ``khz`` (KVM_SET_TSC_KHZ). KVM accepts the host's own rate
        (within 250 ppm) anywhere; other rates need TSC scaling (KVM_CAP_TSC_CONTROL), except
        that a faster rate on a host without it is approximated by catching up on each entry."""
        k.ioctl(self.fd, k.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        """Tell a kvmclock guest it was paused (KVM_KVMCLOCK_CTRL): KVM sets PVCLOCK_GUEST_STOPPED
        in the guest's pvclock page so its soft-lockup watchdog does not count the pause. Fails
        with EINVAL while the guest has not enabled kvmclock on this vCPU."""
        k.ioctl(self.fd, k.KVM_KVMCLOCK_CTRL)

    # -- MSRs ----------------------------------------------------------------------------------
    def get_msrs(self, indices: typing.Iterable[int]) -> list[tuple[int, int]]:
        """Read MSRs; raises :class:`MsrAccessError` naming the first one KVM refuses."""
        wanted = list(indices)
        msrs = s.kvm_msrs_with(len(wanted))
        for i, index in enumerate(wanted):
            msrs.entries[i].index = index
        done = k.ioctl(self.fd, k.KVM_GET_MSRS, msrs)
        if done < len(wanted):
            raise MsrAccessError(errno.EINVAL, f"KVM cannot read MSR {wanted[done]:#x}",
                                 index=wanted[done])
        return [(msrs.entries[i].index, msrs.entries[i].data) for i in range(len(wanted))]

    def set_msrs(self, entries: typing.Iterable[tuple[int, int]]) -> None:
        """Write (index, value) pairs; raises :class:`MsrAccessError` naming the first refused."""
        pairs = list(entries)
        msrs = s.kvm_msrs_with(len(pairs))
        for i, (index, value) in enumerate(pairs):
            msrs.entries[i].index = index
            msrs.entries[i].data = value & 0xFFFF_FFFF_FFFF_FFFF
        done = k.ioctl(self.fd, k.KVM_SET_MSRS, msrs)
        if done < len(pairs):
            index, value = pairs[done]
            raise MsrAccessError(errno.EINVAL, f"KVM refused to set MSR {index:#x} to {value:#x}",
                                 index=index)

    # -- CPUID ---------------------------------------------------------------------------------
    def set_cpuid2(self, entries: typing.Iterable[CpuidEntry]) -> None:
        k.ioctl(self.fd, k.KVM_SET_CPUID2, s.cpuid2_from_entries(entries))

    def get_cpuid2(self) -> list[CpuidEntry]:
        count = 64
        while True:
            buf = s.kvm_cpuid2_with(count)
            try:
                k.ioctl(self.fd, k.KVM_GET_CPUID2, buf)
            except OSError as exc:
                if exc.errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return s.entries_from_cpuid2(buf)

    # -- local APIC, events, MP state ----------------------------------------------------------
    def get_lapic(self) -> s.kvm_lapic_state:
        lapic = s.kvm_lapic_state()
        k.ioctl(self.fd, k.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        k.ioctl(self.fd, k.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        events = s.kvm_vcpu_events()
        k.ioctl(self.fd, k.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        k.ioctl(self.fd, k.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        state = s.kvm_mp_state()
        k.ioctl(self.fd, k.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        k.ioctl(self.fd, k.KVM_SET_MP_STATE, s.kvm_mp_state(mp_state))

    def nmi(self) -> None:
        """Queue an NMI for this vCPU (KVM_NMI)."""
        k.ioctl(self.fd, k.KVM_NMI)

    def translate(self, gva: int) -> Translation:
        """Walk the guest's current page tables for linear address ``gva`` (KVM_TRANSLATE)."""
        tr = s.kvm_translation(linear_address=gva)
        k.ioctl(self.fd, k.KVM_TRANSLATE, tr)
        return Translation(gva, tr.physical_address, bool(tr.valid), bool(tr.writeable),
                           bool(tr.usermode))

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._map is None:
            return
        # Drop every view of the mapping first: mmap.close() refuses while buffers are exported.
        self._page.release()
        del self._run
        self._map.close()
        self._map = None
        fd, self.fd = self.fd, -1
        os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
