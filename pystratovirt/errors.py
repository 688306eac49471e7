"""The one root of pystratovirt's own exceptions, and the QMP error classes they carry.

Every error a user, a QMP client or a guest can cause is a :class:`PyStratoVirtError` (or a
subclass) whose ``desc`` is one sentence the person can act on. The front ends catch the root
once: the CLI prints ``stratovirt: <desc>`` and exits 1, the QMP server answers
``{"error":{"class":<error_class>,"desc":<desc>}}``. A lower layer raises its own subclass and a
higher layer lets it pass (or adds context with ``raise ... from exc``), so the type, the errno
and the cause survive into logs and tests instead of being re-wrapped as text.

The hierarchy (each module documents its own class)::

    PyStratoVirtError
     +-- KvmUnavailableError   kvm/system.py     /dev/kvm cannot be used
     +-- GuestMemoryError      memory/guest.py   a guest physical range outside RAM, or RAM that
     |                                           cannot be backed as asked
     +-- BootError             boot/errors.py    kernel, initrd, command line, boot tables
     |    +-- ElfError         boot/elf.py       an ELF kernel that cannot be loaded
     +-- UnhandledEmulationFailure  cpu/pvm.py   an instruction an emulating host cannot run
     +-- StateFormatError      cpu/state.py      saved vCPU/VM state that cannot be read
     +-- StateRestoreError     cpu/state.py      saved state KVM refuses (also an OSError)
     +-- QueueError            virtio/queue.py   a malformed virtqueue (guest input)
     +-- BackendError          virtio/block_backend.py  a disk image cannot be used
     +-- TapError              virtio/tap.py     a tap cannot be used
     +-- VhostNetError         virtio/vhost_net.py  vhost-net cannot be used
     +-- VhostVsockError       virtio/vhost_vsock.py  vhost-vsock cannot be used
     +-- RngError              virtio/rng.py     the random source or the rate limit is unusable
     +-- ChardevError          devices/chardev.py  a chardev cannot be created
     +-- MachineError          machine/requests.py  a management request the machine refused
     |    +-- DescriptorError  machine/fds.py    a descriptor the VMM was not given
     +-- SnapshotError         machine/snapshot_format.py  a snapshot cannot be written, read or used
     +-- ConfigError           config/errors.py  the command line or JSON file is invalid
     +-- QmpError              qmp/schema.py     a QMP message the protocol layer refused
     +-- QmpSocketError        qmp/server.py     the QMP socket cannot be created
     +-- SeccompError          util/seccomp.py   a seccomp filter cannot be built or installed
     +-- JailError             util/jail.py      the chroot or the privilege drop failed
     +-- OzoneArgError, CgroupError, OzoneError  ozone/   the jailer's arguments, cgroups, namespaces

Errors that never reach a user stay plain Python exceptions: a VMM bug (an overlapping bus range,
``BusError``), or a phrase a caller turns into its own sentence (``StrictJsonError``,
``PayloadError``, ``AmlError``, ``MsrAccessError``).

This module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

import enum


class ErrorClass(enum.Enum):
    """QMP error classes (StratoVirt's set; QEMU's names)."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    KVM_MISSING_CAP = "KVMMissingCap"
    OPERATION_THROTTLED = "OperationThrottled"


def printable(text: str) -> str:
    """Escape control characters and lone surrogates so that a sentence quoting a user's (or a
    file's) text stays one printable line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class PyStratoVirtError(Exception):
    """An error with one sentence for the user (``desc``) and the QMP class it is reported as."""

    error_class: ErrorClass = ErrorClass.GENERIC_ERROR

    def __init__(self, desc: str, error_class: ErrorClass | None = None):
        super().__init__(desc)
        self.desc = desc
        if error_class is not None:
            self.error_class = error_class
