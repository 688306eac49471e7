"""The VMM's seccomp policy: which system calls (and ioctl requests) each kind of thread may make.

Measured, not guessed: ``bench/syscalls.py`` traces whole probe-guest life cycles (boot, disk
and network I/O, disk and NIC hot-plug over QMP, balloon, stop/cont, quit, and SIGTERM) with
``strace -f -ff``, attributes every call made after a thread's filter point to its kind, and
lists what this policy lacks; the probe-guest test tier runs with these filters on. A few calls
are here for paths such a life cycle does not take; each says which path.

Rules with conditions: ``ioctl`` is allowed per request number (the KVM and tun/tap numbers come
from the modules that issue them); ``mmap``/``mprotect`` never with PROT_EXEC (the interpreter
needs new memory, never new code: no thread loads a library or builds a trampoline once it
runs); ``socket`` only in the two families the tap checks use. Everything else a kind may call
it may call with any arguments.

Sizes (system calls per kind, ioctl requests in brackets) are printed by ``bench/syscalls.py``
and reported in ``docs/security.md``.
"""

from __future__ import annotations

import mmap
import socket
import termios

from ..kvm import ioctl as kvm
from ..util.seccomp import Rule, ThreadKind, allow, allow_ioctls
from ..virtio import tap

_NO_EXEC = ((2, mmap.PROT_EXEC, 0),)
SIOCGIFINDEX = 0x8933  # <linux/sockios.h>; socket.if_nametoindex() issues it


# -- every thread: the Python interpreter itself -------------------------------------------------
_INTERPRETER = [
    # The GIL, every threading.Lock/Condition and the vCPU pause gate are futexes.
    *allow("futex"),
    # Allocation: pymalloc's arenas, big objects and glibc's per-thread heaps come from mmap and
    # are given back with munmap/madvise; glibc grows a thread's heap with mprotect and the main
    # heap with brk; realloc of a big block is mremap. Never executable.
    Rule("mmap", _NO_EXEC), Rule("mprotect", _NO_EXEC),
    *allow("munmap", "madvise", "brk", "mremap"),
    # Logging (stderr or the -D file), print() of a fatal error, and the loop's wake-up pipe.
    *allow("write"),
    # Closing what a thread opened or was handed (eventfds at shutdown, sockets, backends).
    *allow("close"),
    # logging records the pid; threading.get_native_id() (every KVM_RUN records its thread).
    *allow("getpid", "gettid"),
    # A signal may land on any thread (SIGTERM, SIGINT, the SIGUSR1 kick): its handler returns
    # through rt_sigreturn; glibc blocks all signals around thread exit.
    *allow("rt_sigreturn", "rt_sigprocmask"),
    # Time where the vDSO cannot answer (time.monotonic()/time.time() fall back to the system
    # call on hosts without a stable TSC clocksource) and time.sleep().
    *allow("clock_gettime", "clock_nanosleep"),
    # The end of a thread, and of the process (os._exit from any thread, interpreter exit).
    *allow("exit", "exit_group"),
]

# -- vCPU threads ----------------------------------------------------------------------------------
_VCPU = [
    # Running the guest, and the register work cpu/pvm.py does on an emulation failure
    # (int3 -> inject #BP through vCPU events, fwait -> step RIP, ldmxcsr/stmxcsr -> decode the
    # operand through page-table translation and move MXCSR through the XSAVE area).
    *allow_ioctls(kvm.KVM_RUN,
                  kvm.KVM_GET_REGS, kvm.KVM_SET_REGS, kvm.KVM_GET_SREGS, kvm.KVM_TRANSLATE,
                  kvm.KVM_GET_VCPU_EVENTS, kvm.KVM_SET_VCPU_EVENTS,
                  kvm.KVM_GET_XSAVE, kvm.KVM_SET_XSAVE),
    # Exit handling. The UART raises and lowers its interrupt line; a virtio-net driver that
    # sets DRIVER_OK makes the device tell the tap which offloads it may use.
    *allow_ioctls(kvm.KVM_IRQ_LINE, tap.TUNSETOFFLOAD),
    # A virtio status write (activate, reset) re-arms the NIC's tap on its I/O thread's epoll; the UART output
    # and eventfd signals are writes (above).
    *allow("epoll_ctl"),
]

# -- device I/O threads (virtio queue threads, tap pollers) ----------------------------------------
_IO = [
    # Waiting for queue notifications (ioeventfds) and the tap, and re-arming the tap's events.
    *allow("epoll_wait", "epoll_pwait", "epoll_ctl"),
    # Draining eventfds (an 8-byte read); the used-buffer interrupt is an eventfd write (above).
    *allow("read"),
    # virtio-blk: reads and writes (preadv/pwritev through Python's os.preadv/os.pwritev, which
    # use the v2 calls), flush, discard and write-zeroes (fallocate), and switching O_DIRECT off
    # for a request the bounce buffer cannot align (fcntl F_GETFL/F_SETFL).
    *allow("preadv", "pwritev", "preadv2", "pwritev2", "fdatasync", "fallocate", "fcntl"),
    # virtio-net: frames to and from the tap.
    *allow("readv", "writev"),
    # A tap that fails is checked for detachment (TUNGETIFF) before the NIC gives it up; a tap
    # hot-plugged into an active NIC gets the offloads its driver accepted (the swap runs here).
    *allow_ioctls(tap.TUNGETIFF, tap.TUNSETOFFLOAD),
    # virtio-rng: the random source is read with read (above). virtio-console: a socket chardev
    # accepts its one client here, makes it non-blocking (FIONBIO) and moves the bytes with
    # recv/send (recvfrom/sendto); the accepted socket's object asks for its address; pty, stdio
    # and file chardevs use read/write (above).
    *allow("accept4", "getsockname", "recvfrom", "sendto"),
    *allow_ioctls(termios.FIONBIO),
    # A backend swap (device_add/device_del) closes the old disk image or tap on this thread,
    # after its last request (close is allowed above, with the interpreter's calls).
    # The balloon returns pages with madvise(MADV_DONTNEED) (allowed above).
]

# -- the control loop (main thread) ----------------------------------------------------------------
_CONTROL = [
    # The loop: epoll and its wake-up pipe; the console's stdin.
    *allow("epoll_wait", "epoll_pwait", "epoll_ctl", "read"),
    # QMP: new clients, their bytes, and descriptors passed with SCM_RIGHTS (recvmsg/sendmsg).
    *allow("accept4", "recvfrom", "sendto", "recvmsg", "sendmsg", "shutdown"),
    # A socket object's repr (built for the ResourceWarning of one collected unclosed, even
    # when the warning is filtered out) and its creation from an accepted fd ask for addresses.
    *allow("getsockname", "getpeername"),
    # Hot-plug: look at and open a disk image or /dev/net/tun; size a backend; O_DIRECT probe
    # reads; make a tap non-blocking; flush a disk being unplugged or hot-replaced.
    *allow("openat", "newfstatat", "fstat", "lseek", "fcntl", "preadv", "preadv2", "fdatasync"),
    # Hot-plug of a NIC: the tap check asks the tap's driver (ethtool) and its index through a
    # datagram socket; attaching and configuring the tap.
    Rule("socket", ((0, 0xFFFF_FFFF, socket.AF_UNIX),)),
    Rule("socket", ((0, 0xFFFF_FFFF, socket.AF_INET),)),
    *allow_ioctls(tap.SIOCETHTOOL, SIOCGIFINDEX,
                  tap.TUNSETIFF, tap.TUNGETIFF, tap.TUNSETVNETHDRSZ, tap.TUNSETVNETLE,
                  tap.TUNSETOFFLOAD, termios.FIONBIO),
    # The serial console's input raises the UART's interrupt line.
    *allow_ioctls(kvm.KVM_IRQ_LINE),
    # Pausing and stopping vCPUs: pthread_kill(SIGUSR1) kicks a thread out of KVM_RUN.
    *allow("tgkill"),
    # -serial stdio on a terminal: the terminal's settings are restored at exit.
    *allow_ioctls(termios.TCGETS, termios.TCSETS, termios.TCSETSW, termios.TCSETSF),
    # Snapshots (QMP migrate, VM paused): every vCPU's and the in-kernel devices' state is read
    # (KVM_GET_* only: a restore sets state before any filter exists, so nothing here can change
    # a vCPU's registers), guest RAM is written out sparsely (pagemap is read to find the pages
    # in use) and the state file is written to a temporary name, synced and renamed into place.
    *allow_ioctls(kvm.KVM_GET_REGS, kvm.KVM_GET_SREGS, kvm.KVM_GET_MSRS, kvm.KVM_GET_XSAVE2,
                  kvm.KVM_GET_XCRS, kvm.KVM_GET_DEBUGREGS, kvm.KVM_GET_LAPIC, kvm.KVM_GET_VCPU_EVENTS,
                  kvm.KVM_GET_MP_STATE, kvm.KVM_GET_CPUID2, kvm.KVM_GET_TSC_KHZ, kvm.KVM_GET_IRQCHIP,
                  kvm.KVM_GET_PIT2, kvm.KVM_GET_CLOCK),
    *allow("mkdir", "pread64", "pwrite64", "ftruncate", "fsync", "rename"),
    # Shutdown: the QMP socket file and the pidfile are removed; the interpreter resets its
    # signal handlers as it finalizes.
    *allow("unlink", "rt_sigaction"),
]

POLICY: dict[ThreadKind, list[Rule]] = {
    ThreadKind.VCPU: _INTERPRETER + _VCPU,
    ThreadKind.IO: _INTERPRETER + _IO,
    ThreadKind.CONTROL: _INTERPRETER + _CONTROL,
}
