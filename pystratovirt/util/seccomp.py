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
be worse than a clean death. The filters are built by libseccomp (through the ``pyseccomp``
binding), never assembled by hand.

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
from typing import Protocol

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

_policy: Policy | None = None
_lock = threading.Lock()


def activate(policy: Policy) -> None:
    """From now on, :func:`install` loads ``policy``'s filter in each calling thread.

    Every filter is built once here, on the calling thread, so a policy that libseccomp refuses
    (an unknown system call name) fails at start-up with a clear sentence, not in a vCPU thread.
    From now on a thread that has installed its filter never makes :mod:`linecache` touch the
    file system (see :func:`_guard_linecache`); :func:`cache_sources` gives them source lines,
    and may run later, off the start-up path.
    """
    global _policy
    for kind in ThreadKind:
        if kind not in policy:
            raise SeccompError(f"The seccomp policy has no allow-list for {kind.value} threads.")
        build_filter(policy[kind])
    _guard_linecache()
    with _lock:
        _policy = policy


_filtered = threading.local()  # .on: this thread has loaded its filter


def _guard_linecache() -> None:
    """Formatting a traceback reads each frame's source through :mod:`linecache`: a stat() to
    re-check a cached file, a stat() and an open() for an uncached one. A filtered thread may
    make neither (it would die of SIGSYS instead of logging), so in such a thread an uncached
    file has no source lines and nothing is re-checked; other threads are unchanged."""
    import linecache

    if getattr(linecache, "_pystratovirt_guarded", False):
        return
    update, check = linecache.updatecache, linecache.checkcache

    def updatecache(filename: str, module_globals: dict[str, object] | None = None) -> list[str]:
        return [] if getattr(_filtered, "on", False) else update(filename, module_globals)

    def checkcache(filename: str | None = None) -> None:
        if not getattr(_filtered, "on", False):
            check(filename)

    linecache.updatecache, linecache.checkcache = updatecache, checkcache
    linecache._pystratovirt_guarded = True  # type: ignore[attr-defined]  # our mark on the module


def cache_sources() -> None:
    """Read the source of every loaded Python module into :mod:`linecache` now, marked as never
    to be re-checked (an entry without mtime is not re-validated).

    A traceback (``log.exception`` in a thread's last-resort handler) looks up each frame's
    source line; uncached, that is a stat() and an open() of the .py file, which a vCPU or I/O
    thread may not make (the guard installed by :func:`activate` then shows the frame without
    its line), and which inside a ``-run-with chroot`` jail would find nothing. About 3 MB of
    text for the running VMM, some 25 ms: the front end reads it once the vCPUs run, before the
    control loop's own filter, so the guest does not wait for it.
    """
    import linecache
    import sys

    for module in list(sys.modules.values()):
        filename = getattr(module, "__file__", None)
        if not filename or not filename.endswith(".py") or filename in linecache.cache:
            continue
        lines = linecache.getlines(filename)
        if lines:
            linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


def deactivate() -> None:
    """Forget the policy (threads that already installed their filter keep it: it cannot be removed)."""
    global _policy
    with _lock:
        _policy = None


def active() -> bool:
    return _policy is not None


class SeccompFilter(Protocol):
    """What this module uses of a ``pyseccomp.SyscallFilter`` (pyseccomp publishes no types; its
    constants are opaque here, hence ``object``)."""

    def set_attr(self, attr: object, value: object) -> None: ...
    def add_rule(self, action: object, syscall: int, *conditions: object) -> None: ...
    def load(self) -> None: ...


def build_filter(rules: Sequence[Rule]) -> SeccompFilter:
    """A libseccomp filter that allows ``rules`` and kills the process on anything else."""
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as exc:  # RuntimeError: libseccomp.so itself is missing
        raise SeccompError(f"seccomp needs libseccomp and its pyseccomp binding ({exc}); "
                           "install them or run with -disable-seccomp.") from None
    flt: SeccompFilter = pyseccomp.SyscallFilter(pyseccomp.KILL_PROCESS)
    # A system call made through another ABI (int 0x80, x32) is killed like an unlisted one.
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
            raise SeccompError(f"libseccomp refused the rule for {rule.syscall}: {exc}.") from None
    return flt


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
    policy = _policy
    if policy is None:
        _name_thread()
        return
    try:
        try:
            flt = build_filter(policy[kind])
            _name_thread()
            flt.load()
            _filtered.on = True
        except OSError as exc:
            raise SeccompError(f"Cannot install the seccomp filter of a {kind.value} thread: "
                               f"{exc.strerror or exc}.") from None
    except SeccompError as exc:
        if threading.current_thread() is threading.main_thread():
            raise
        os.write(2, f"stratovirt: {exc}\n".encode())
        os._exit(1)


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
