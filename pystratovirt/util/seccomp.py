"""seccomp filters, one per thread kind: the mechanism (``ThreadKind``, ``Rule``, ``install``).

Linux attaches a seccomp filter to one thread, and a thread inherits the filters of the thread
that created it. So, as in Firecracker, every thread of the VMM installs the filter of its own
kind as the first thing it does, before it touches anything the guest or a client controls:

* a vCPU thread before its first ``KVM_RUN``;
* a device I/O thread (virtio queue thread, tap poller) before its first ``epoll_wait``;
* the main thread (the control loop) after the VM is built and every other thread has started,
  right before the loop runs. It must come last: a thread created after it would inherit its
  filter on top of its own, and every call would have to pass both.

A system call outside the kind's allow-list kills the whole process with SIGSYS
(SECCOMP_RET_KILL_PROCESS): a half-dead VMM (a vCPU thread gone, the loop still answering) would
be worse than a clean death. The filters are built by libseccomp through the ``pyseccomp``
binding, never assembled by hand: each kind's allow-list is compiled once, in :func:`activate`,
and the BPF program libseccomp exports is kept; a thread then installs its program with one
``seccomp(SECCOMP_SET_MODE_FILTER)``, as ``seccomp_load`` would (no_new_privs first, no flags),
rather than having libseccomp regenerate the same program in every thread.

Tracebacks and warnings look up source lines through :mod:`linecache`, which stats and opens the
``.py`` file; a vCPU or I/O thread may do neither (it would die of SIGSYS). Rather than reading
every module's source into memory up front (megabytes of text kept for a traceback that may
never come), :func:`activate` makes linecache answer "no source" in threads whose filter has no
file access (:func:`_guard_linecache`): their tracebacks name file, line and function; the
control loop's still show source lines (it may open files), and a ``-run-with`` jail caches the
sources before the chroot (:func:`cache_sources`), since nothing can be read after it.

This module is only the mechanism. What each kind may call (the policy) belongs to the layer
that knows the KVM and tun/tap ioctl numbers: :mod:`pystratovirt.machine.seccomp_policy`. The
front end hands the policy over once with :func:`activate` before the machine starts its
threads; without it (``-disable-seccomp``, unit tests, tools), :func:`install` only names the
thread.

Every thread's OS name is set here too (``ps -L``, ``top -H``, ``/proc/PID/task/*/comm``): a
worker gets its Python name (``vcpu0``, ``virtio-blk0``, ...); the main thread keeps the
process's name but sets it again, so that each thread's trace shows where its sandbox starts
(``bench/syscalls.py`` splits traces there).
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PyStratoVirtError
from .libc import LIBC

log = logging.getLogger(__name__)

_PR_SET_NAME = 15
_PR_GET_NAME = 16
_TASK_COMM_LEN = 16


class SeccompError(PyStratoVirtError):
    """A filter could not be built or installed; the message is one sentence for the user."""


class ThreadKind(enum.Enum):
    """The kinds of thread the VMM runs, each with its own allow-list."""

    VCPU = "vcpu"          # KVM_RUN and the device emulation its exits call
    IO = "io"              # virtio queue threads and tap pollers
    CONTROL = "control"    # the main thread: the control loop, QMP, hot-plug, shutdown


@dataclass(frozen=True)
class Rule:
    """Allow ``syscall`` when every ``(argument index, mask, value)`` holds:
    ``(arg & mask) == value``. No conditions: allow it with any arguments.

    Several rules for one system call are alternatives (any one allows the call).
    """

    syscall: str
    args: tuple[tuple[int, int, int], ...] = ()


def allow(*names: str) -> list[Rule]:
    """Rules allowing each named system call with any arguments."""
    return [Rule(name) for name in names]


def allow_ioctls(*requests: int) -> list[Rule]:
    """Rules allowing ``ioctl`` with exactly these request numbers. The kernel reads the request
    as a 32-bit unsigned int, so only the low 32 bits of the register are compared (a caller
    that sign-extends a request with the top bit set still matches)."""
    return [Rule("ioctl", ((1, 0xFFFF_FFFF, request),)) for request in requests]


Policy = Mapping[ThreadKind, Sequence[Rule]]

# Kinds whose threads may not touch the file system (see _guard_linecache).
_NO_FILES = frozenset({ThreadKind.VCPU, ThreadKind.IO})

_programs: dict[ThreadKind, bytes] | None = None   # the active policy, compiled
_lock = threading.Lock()
_local = threading.local()                          # .kind: the calling thread's filter, if any


def activate(policy: Policy) -> None:
    """From now on, :func:`install` loads ``policy``'s filter in each calling thread.

    Every filter is compiled once here, on the calling thread, so a policy that libseccomp
    refuses (an unknown system call name) fails at start-up with a clear sentence, not in a
    vCPU thread; threads then only load the compiled program.
    """
    global _programs
    for kind in ThreadKind:
        if kind not in policy:
            raise SeccompError(f"The seccomp policy has no allow-list for {kind.value} threads.")
    programs = {kind: build_filter(policy[kind]) for kind in ThreadKind}
    _guard_linecache()
    with _lock:
        _programs = programs


def cache_sources() -> None:
    """Read the source of every loaded Python module into :mod:`linecache` now, marked as never
    to be re-checked (an entry without mtime is not re-validated), so that tracebacks show
    source lines where the files cannot be read any more (inside a ``-run-with`` chroot).
    About 3 MB of text for the running VMM: only the jail pays for it."""
    import linecache
    import sys

    for module in list(sys.modules.values()):
        filename = getattr(module, "__file__", None)
        if not filename or not filename.endswith(".py") or filename in linecache.cache:
            continue
        lines = linecache.getlines(filename)
        if lines:
            linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


def _guard_linecache() -> None:
    """Make :mod:`linecache` look at no file in a thread whose filter forbids file access.

    ``traceback`` (and so ``log.exception``) and ``warnings`` find source lines through
    ``linecache.getlines``, which calls ``linecache.updatecache`` for a file it has not cached
    (stat, open, read) and ``linecache.checkcache`` to re-validate a cached one (stat). Both are
    looked up as module attributes at call time, so wrapping them here covers every caller: in
    a vCPU or I/O thread the source is "unavailable" (the traceback keeps file, line and
    function) and nothing is cached for it, so the control loop still finds it later.
    """
    import linecache

    if getattr(linecache.updatecache, "_pystratovirt_guard", False):
        return
    update, check = linecache.updatecache, linecache.checkcache

    def updatecache(filename: str, module_globals: dict[str, Any] | None = None) -> list[str]:
        if getattr(_local, "kind", None) in _NO_FILES:
            return []
        return update(filename, module_globals)

    def checkcache(filename: str | None = None) -> None:
        if getattr(_local, "kind", None) in _NO_FILES:
            return
        check(filename)

    updatecache._pystratovirt_guard = True  # type: ignore[attr-defined]
    linecache.updatecache, linecache.checkcache = updatecache, checkcache


def deactivate() -> None:
    """Forget the policy (threads that already installed their filter keep it: it cannot be removed)."""
    global _programs
    with _lock:
        _programs = None


def active() -> bool:
    return _programs is not None


# -- libseccomp ------------------------------------------------------------------------------------
_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP = 317              # x86_64
_SECCOMP_SET_MODE_FILTER = 1
_BPF_INSN = 8      # sizeof(struct sock_filter)


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: the program seccomp(SECCOMP_SET_MODE_FILTER) loads."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def build_filter(rules: Sequence[Rule]) -> bytes:
    """Compile ``rules`` with libseccomp (through the ``pyseccomp`` binding) into a BPF program
    (a ``struct sock_filter`` array, as ``seccomp_export_bpf`` writes it) that allows them and
    kills the process on anything else, other ABIs (int 0x80, x32) included."""
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as exc:  # RuntimeError: libseccomp.so itself is missing
        raise SeccompError(f"seccomp needs libseccomp and its pyseccomp binding ({exc}); install them "
                           "(Debian: libseccomp2; pip: pyseccomp) or run with -disable-seccomp.") from None
    flt = pyseccomp.SyscallFilter(pyseccomp.KILL_PROCESS)
    try:
        flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        for rule in rules:
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, rule.syscall)
            if number < 0:
                raise SeccompError(f"The seccomp policy names an unknown system call: {rule.syscall}.")
            conditions = [pyseccomp.Arg(index, pyseccomp.MASKED_EQ, mask, value)
                          for index, mask, value in rule.args]
            try:
                flt.add_rule(pyseccomp.ALLOW, number, *conditions)
            except OSError as exc:
                raise SeccompError(f"libseccomp refused the rule for {rule.syscall}: "
                                   f"{exc.strerror or exc}.") from None
        with open(os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC), "w+b") as exported:
            try:
                flt.export_bpf(exported)
            except OSError as exc:
                raise SeccompError(f"libseccomp could not export the filter: {exc.strerror or exc}.") from None
            exported.seek(0)  # libseccomp wrote through the descriptor; read it from the start
            program = exported.read()
    finally:
        del flt  # releases the libseccomp context
    if not program or len(program) % _BPF_INSN or len(program) // _BPF_INSN > 0xFFFF:
        raise SeccompError(f"libseccomp exported a filter of {len(program)} bytes, not a BPF program.")
    return bytes(program)


def _load(program: bytes) -> None:
    """Attach a compiled program to the calling thread as seccomp_load does: no_new_privs, then
    seccomp(SECCOMP_SET_MODE_FILTER) without flags. Raises OSError."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // _BPF_INSN, ctypes.addressof(buf))
    if LIBC.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if LIBC.syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_ulong(_SECCOMP_SET_MODE_FILTER),
                    ctypes.c_ulong(0), ctypes.byref(prog)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def syscall_names(rules: Sequence[Rule]) -> set[str]:
    """The system calls a list of rules allows (with or without argument conditions)."""
    return {rule.syscall for rule in rules}


def install(kind: ThreadKind) -> None:
    """Name the calling thread and, if a policy is active, load ``kind``'s filter on it.

    Loading sets no_new_privs first (the kernel requires it of an unprivileged process, and it
    is harmless for root). If the kernel refuses the filter, the main thread gets SeccompError
    (the front end reports it and exits); a worker thread must not run unconfined either, and
    has nobody to report to, so it ends the process at once with that sentence on stderr
    (nothing needs flushing: workers install their filter before they serve anything).
    """
    programs = _programs
    _name_thread()
    if programs is None:
        return
    try:
        _load(programs[kind])
    except OSError as exc:
        message = f"Cannot install the seccomp filter of a {kind.value} thread: {exc.strerror or exc}."
        if threading.current_thread() is threading.main_thread():
            raise SeccompError(message) from None
        os.write(2, f"stratovirt: {message}\n".encode())
        os._exit(1)
    _local.kind = kind


def _name_thread() -> None:
    if threading.current_thread() is threading.main_thread():
        buf = ctypes.create_string_buffer(_TASK_COMM_LEN)
        LIBC.prctl(_PR_GET_NAME, buf, 0, 0, 0)
        name = buf.value
    else:
        name = threading.current_thread().name.encode(errors="replace")[:_TASK_COMM_LEN - 1]
    LIBC.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def filter_mode(pid: int | str = "self", tid: int | str | None = None) -> int:
    """The ``Seccomp:`` field of a process's or thread's status: 0 none, 1 strict, 2 filter."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    raise SeccompError(f"{path} has no Seccomp field.")
