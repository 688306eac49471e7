"""The VMM's own half of the jail (``-run-with chroot=DIR,user=UID:GID``): chroot and privilege drop.

A Python VMM cannot be exec'd inside an empty chroot (the interpreter and its library live
outside), so, as QEMU's ``-run-with`` does, the VMM builds the VM first, with every file,
/dev/kvm and its sockets open, and only then locks itself in (:func:`enter`):

1. import every module the running VM can need and cache their sources (nothing can be
   imported, and no traceback can read a .py file, once the interpreter's files are gone);
2. ``chroot(DIR)`` and ``chdir("/")``: from now on every path a QMP client names (a
   hot-plugged disk's filename) resolves inside DIR, so ``../../etc/shadow`` finds nothing;
3. drop every capability from the bounding set (so nothing can come back through an exec) and
   clear the ambient set;
4. ``setgroups([])``, then ``setresgid`` and ``setresuid`` to the given ids;
5. ``capset``: effective, permitted and inheritable sets empty (or only ``caps=``);
6. ``PR_SET_NO_NEW_PRIVS`` (seccomp needs it in an unprivileged process anyway).

It must run before the machine starts any thread: capabilities are per thread, and glibc makes
every thread repeat a setuid. :func:`enter` refuses to run with other threads alive.

What needs to be in DIR: the files hot-plugged later, and ``dev/net/tun`` for a NIC hot-plugged
by name after the chroot (``ozone`` creates it). /dev/kvm is not needed inside: the VMM opens it
before the chroot, as it opens the boot disks, taps, kernel and sockets.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pkgutil
import threading

from ..errors import PyStratoVirtError
from .libc import LIBC

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# <linux/capability.h>, in number order.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)


class JailError(PyStratoVirtError):
    """Entering the jail failed; the message is one sentence for the user."""


def capability_number(name: str) -> int | None:
    """``CAP_NET_ADMIN`` (or ``net_admin``) -> 12; None for an unknown name."""
    upper = name.strip().upper()
    if not upper.startswith("CAP_"):
        upper = "CAP_" + upper
    try:
        return CAPABILITIES.index(upper)
    except ValueError:
        return None


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, arg: int, what: str) -> None:
    if LIBC.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise JailError(f"Cannot {what}: {os.strerror(err)}.")


def _capset(mask: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFF_FFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    if LIBC.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise JailError(f"Cannot clear the capability sets: {os.strerror(err)}.")


def capability_sets() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, as bit masks (capget)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if LIBC.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise JailError(f"Cannot read the capability sets: {os.strerror(err)}.")
    return tuple(getattr(data[0], f) | (getattr(data[1], f) << 32)
                 for f in ("effective", "permitted", "inheritable"))


def preload() -> None:
    """Import every module of the VMM a running VM can reach (not the guest kit, nor the
    jailer), then cache every loaded module's source for tracebacks."""
    import pystratovirt

    from . import seccomp

    for info in pkgutil.walk_packages(pystratovirt.__path__, "pystratovirt."):
        if info.name.startswith(("pystratovirt.guest", "pystratovirt.ozone")) or info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
    # Lazily imported by the standard library on paths the running VM takes.
    for name in ("encodings.idna", "pwd", "grp"):
        importlib.import_module(name)
    seccomp.cache_sources()


def inside(root: str, path: str | None) -> str | None:
    """Where ``path`` (an absolute path outside) is seen from inside a chroot at ``root``; None
    for a path outside the jail."""
    if path is None:
        return None
    root = os.path.realpath(root)
    full = os.path.abspath(path)
    if full == root:
        return "/"
    if full.startswith(root.rstrip("/") + "/"):
        return "/" + os.path.relpath(full, root)
    return None


def enter(chroot: str | None, uid: int | None, gid: int | None, keep_caps: tuple[str, ...] = ()) -> None:
    """Lock the process into ``chroot`` as ``uid``/``gid`` with only ``keep_caps`` (see the
    module docstring); raises JailError with one sentence if any step fails."""
    if threading.active_count() != 1:
        raise JailError("The privilege drop must happen before the VM starts its threads.")
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
    except (OSError, ValueError):
        last_cap = len(CAPABILITIES) - 1
    keep = 0
    for name in keep_caps:
        number = capability_number(name)
        if number is None:
            raise JailError(f"Unknown capability {name}.")
        keep |= 1 << number
    preload()
    if chroot is not None:
        try:
            os.chroot(chroot)
            os.chdir("/")
        except OSError as exc:
            raise JailError(f"Cannot chroot into {chroot}: {exc.strerror}.") from None
    for cap in range(last_cap + 1):
        if not keep & (1 << cap):
            _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient capabilities")
    if keep:
        _prctl(PR_SET_KEEPCAPS, 1, "keep capabilities across the user change")
    try:
        if gid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
        if uid is not None:
            os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise JailError(f"Cannot change to user {uid} and group {gid}: {exc.strerror}.") from None
    _capset(keep)
    if keep:
        _prctl(PR_SET_KEEPCAPS, 0, "reset the keep-capabilities flag")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
