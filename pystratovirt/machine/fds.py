"""The file descriptors the VMM was given: inherited at start-up, or passed with QMP ``getfd``.

This module owns the rule that the VMM never closes (or hands to a backend) a descriptor it did
not open or receive. A management client gives the VMM descriptors two ways, as QEMU and
StratoVirt define them:

* **Inherited at start-up.** Kata passes tap and vhost descriptors as 3, 4, ... (Go's
  ``cmd.ExtraFiles``) and names them by number (``-netdev tap,fds=3``). :func:`claim_inherited`
  runs first thing when the VMM starts, before it opens anything of its own, so every descriptor
  >= 3 open at that moment is one the parent passed; it marks each close-on-exec and records it
  by number.
* **Passed over QMP.** ``getfd {"fdname": NAME}`` with the descriptor in SCM_RIGHTS ancillary
  data stores it under NAME (a name already in use is replaced and its old descriptor closed, as
  in QEMU); ``closefd`` releases it.

A backend that wants a descriptor *takes* it with :meth:`Descriptors.take`, by a getfd name or by
an inherited number not yet taken; ownership moves to the backend exactly once, and the store
forgets it. Anything else (a number the VMM merely happens to have open: its KVM handles, its
QMP socket, a disk) is refused with a sentence, so a client can never make the VMM adopt or
close its internal descriptors. At shutdown :meth:`Descriptors.close` closes whatever the store
still holds.

All methods run on the control loop's thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re

from .requests import MachineError

#: The first descriptor a parent can pass (0, 1 and 2 are the standard streams).
FIRST_INHERITED = 3
#: How many getfd descriptors may be held at once: a client cannot exhaust the VMM's limit.
MAX_NAMED = 256
#: getfd names: QEMU only forbids a leading digit; we also keep ':' (which separates the fields
#: of an ``fds`` reference) and anything unprintable out, so a name can never read as a number.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
#: The largest descriptor number a reference may carry (a C ``int``).
FD_MAX = (1 << 31) - 1

_claimed: list[int] | None = None  # what claim_inherited() found, until a store takes it


class DescriptorError(MachineError):
    """A descriptor reference the store refuses; the message is one sentence for the client."""


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return False
        raise
    return True


def open_descriptors(first: int = FIRST_INHERITED) -> list[int]:
    """The descriptors >= ``first`` open in this process right now, in order."""
    # Listing /proc/self/fd opens a directory descriptor of its own, which is in the listing but
    # closed by the time it returns: checking each number leaves it out.
    numbers = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    return [fd for fd in numbers if fd >= first and _is_open(fd)]


def claim_inherited() -> list[int]:
    """Take over every descriptor >= 3 this process inherited; call it before opening anything.

    Each one is made close-on-exec (nothing the VMM starts may inherit it in turn) and recorded
    for the next :meth:`Descriptors.from_process`. Calling it again records nothing new: the
    first call is the one that knows what was inherited.
    """
    global _claimed
    if _claimed is None:
        fds = open_descriptors()
        for fd in fds:
            os.set_inheritable(fd, False)
        _claimed = fds
    return list(_claimed)


def parse_reference(reference: str | int) -> str | int:
    """The descriptor a reference names: an ``int`` for a number, a ``str`` for a getfd name.

    StratoVirt's ``fds`` syntax allows ``name:number``; the last field is the one that counts.
    Raises :class:`DescriptorError` for anything that is neither a number 0..2**31-1 nor a name.
    """
    if isinstance(reference, int) and not isinstance(reference, bool):
        field = str(reference)
    elif isinstance(reference, str):
        field = reference.rsplit(":", 1)[-1]
    else:
        raise DescriptorError(f"{reference!r} is not a file descriptor number or name.")
    if field.isascii() and field.isdigit():
        number = int(field)
        if number <= FD_MAX:
            return number
    elif NAME.fullmatch(field):
        return field
    shown = field[:40].encode("utf-8", "backslashreplace").decode() + ("..." if len(field) > 40
                                                                        else "")
    raise DescriptorError(f"'{shown}' is not a file descriptor number (0 to {FD_MAX}) or a "
                          "getfd name.")


class Descriptors:
    """The descriptors the VMM holds for backends: inherited ones by number, getfd ones by name."""

    def __init__(self, inherited: list[int] | tuple[int, ...] = ()):
        self._inherited: set[int] = set(inherited)  # not yet taken
        self._taken: set[int] = set()  # inherited numbers a backend took (to say so on reuse)
        self._named: dict[str, int] = {}

    @classmethod
    def from_process(cls) -> Descriptors:
        """A store owning what :func:`claim_inherited` found (once: a second store gets none)."""
        global _claimed
        inherited, _claimed = (_claimed or []), []
        return cls(inherited)

    # -- what it holds --------------------------------------------------------------------------
    @property
    def inherited(self) -> list[int]:
        """Inherited descriptors not yet taken, in order."""
        return sorted(self._inherited)

    @property
    def names(self) -> list[str]:
        return sorted(self._named)

    def holds(self, fd: int) -> bool:
        return fd in self._inherited or fd in self._named.values()

    # -- getfd / closefd ------------------------------------------------------------------------
    def put(self, name: str, fd: int) -> None:
        """Hold ``fd`` (received with getfd) under ``name``; the store owns it from now on.

        Whatever happens, the descriptor is not leaked: refused, it is closed here. A name in use
        is re-pointed and its old descriptor closed, as in QEMU.
        """
        try:
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise DescriptorError("Parameter 'fdname' expects a name not starting with a digit.")
            if name not in self._named and len(self._named) >= MAX_NAMED:
                raise DescriptorError(f"Too many file descriptors are held ({MAX_NAMED}); "
                                      "release some with closefd first.")
        except BaseException:
            _close(fd)
            raise
        old = self._named.get(name)
        self._named[name] = fd
        if old is not None and old != fd:
            _close(old)

    def close_named(self, name: str) -> None:
        """closefd: close the descriptor held under ``name``."""
        fd = self._named.pop(name, None)
        if fd is None:
            raise DescriptorError(f"File descriptor named '{name}' not found")
        _close(fd)

    # -- handing descriptors to backends --------------------------------------------------------
    def take(self, reference: str | int) -> int:
        """Transfer a descriptor to the caller, who must close it when done.

        ``reference`` is a getfd name, an inherited descriptor's number (as an int or text), or
        StratoVirt's ``name:number`` (the last field counts). Each descriptor is handed out once.
        """
        which = parse_reference(reference)
        if isinstance(which, str):
            fd = self._named.pop(which, None)
            if fd is None:
                raise DescriptorError(f"File descriptor named '{which}' not found")
            return fd
        if which in self._inherited:
            self._inherited.discard(which)
            self._taken.add(which)
            return which
        if which in self._taken:
            raise DescriptorError(f"File descriptor {which} is already used by another backend.")
        raise DescriptorError(f"File descriptor {which} was not passed to this VMM (use getfd, "
                              "or pass it at start-up).")

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every descriptor still held (inherited ones not taken, getfd ones). Idempotent."""
        held = sorted(self._inherited) + list(self._named.values())
        self._inherited.clear()
        self._named.clear()
        for fd in held:
            _close(fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # already gone: nothing of ours to release
