"""vhost-vsock (``-device vsock`` / ``vhost-vsock-device``): checking the kernel device the user
gives, and why there is no device behind the check.

Owns: deciding whether a vhost-vsock descriptor is usable -- Kata's ``vhostfd=N`` (an open
``/dev/vhost-vsock`` on which it already reserved the guest CID with VHOST_VSOCK_SET_GUEST_CID),
or ``/dev/vhost-vsock`` opened here when no descriptor is given -- and the one
:class:`VhostVsockError` sentence a user gets.

What is checked, for real: the descriptor is open (fstat), it answers the vhost ioctl
VHOST_GET_FEATURES (a regular file, a pipe, a tap or /dev/null does not), and it is the
vhost-vsock misc device (a character device 10:241; vhost-net, which answers the ioctl too, is
10:238). A closed number, a regular file, a tap or a vhost-net descriptor is refused with a
sentence saying which it is; without a descriptor, a missing /dev/vhost-vsock
is refused with the reason (no vhost_vsock module).

What is not implemented: the device itself. virtio-vsock (device id 19: rx, tx and event
queues, the guest CID in config space) with the vhost data path means VHOST_SET_OWNER,
VHOST_SET_FEATURES, VHOST_SET_MEM_TABLE (the guest RAM regions), VHOST_SET_VRING_NUM/ADDR/BASE/
KICK/CALL for rx and tx (the transport's notify eventfds as kicks, the interrupt eventfd as
call), VHOST_VSOCK_SET_GUEST_CID when we opened the device ourselves, VHOST_VSOCK_SET_RUNNING,
and the event queue (transport resets) in the VMM. The development host has no vhost modules
(no /dev/vhost-vsock), so none of that could be run even once, and an untested data path that
has the kernel write guest memory is worse than none. So a descriptor that passes every check
is still refused, with that reason: the VMM never starts a guest with a vsock that does not
work. (vhost-net, :mod:`.vhost_net`, makes the same choice.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from typing import NoReturn

from ..errors import PyStratoVirtError

VHOST_VSOCK_PATH = "/dev/vhost-vsock"

# <linux/vhost.h>: VHOST_VIRTIO is 0xAF; checked against the C header in the tests.
VHOST_GET_FEATURES = 0x8008AF00          # _IOR(VHOST_VIRTIO, 0x00, __u64)
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60   # _IOW(VHOST_VIRTIO, 0x60, __u64)

# <linux/miscdevice.h>: the misc major and the minors of the devices a vhostfd might be.
MISC_MAJOR = 10
VHOST_VSOCK_MINOR = 241
_MISC_NAMES = {VHOST_VSOCK_MINOR: "the vhost-vsock device", 238: "a vhost-net device",
               200: "a tun/tap device"}


class VhostVsockError(PyStratoVirtError):
    """vhost-vsock cannot be used; the message is one sentence for the user."""


def describe(st: os.stat_result, fd: int | None = None) -> str:
    """What kind of file ``st`` (of descriptor ``fd``) is, in words, for the refusal sentences."""
    mode = st.st_mode
    if stat.S_ISCHR(mode):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if major == MISC_MAJOR and minor in _MISC_NAMES:
            return _MISC_NAMES[minor]
        return f"character device {major}:{minor}"
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    if fd is not None:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")   # e.g. anon_inode:[eventfd]
        except OSError:
            pass
    return "an unknown kind of file"


def check_vhost_vsock_fd(fd: int, what: str) -> int:
    """Check that ``fd`` is an open vhost-vsock device answering VHOST_GET_FEATURES; returns its
    vhost features. Raises VhostVsockError with one sentence naming ``what`` otherwise."""
    try:
        st = os.fstat(fd)
    except OSError as err:
        if err.errno == errno.EBADF:
            raise VhostVsockError(f"{what} is not an open file descriptor.") from None
        raise VhostVsockError(f"{what} cannot be used: {err.strerror or err}.") from None
    kind = describe(st, fd)
    features = ctypes.c_uint64(0)
    try:
        fcntl.ioctl(fd, VHOST_GET_FEATURES, features)
    except OSError as err:
        raise VhostVsockError(f"{what} is {kind}, not a vhost-vsock device (VHOST_GET_FEATURES "
                              f"failed: {err.strerror or err}).") from None
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (MISC_MAJOR, VHOST_VSOCK_MINOR):
        raise VhostVsockError(f"{what} is {kind}, not a vhost-vsock device.")
    return features.value


def open_vhost_vsock(guest_cid: int, vhost_fd: int | None = None, path: str = VHOST_VSOCK_PATH) -> NoReturn:
    """Set up vhost-vsock for guest CID ``guest_cid`` on ``vhost_fd`` (Kata's, with the CID
    already set) or on ``path``. Always raises VhostVsockError: the checks above say what is
    wrong with the descriptor, and a descriptor that passes them is refused because the device
    is not implemented (see the module docstring)."""
    if vhost_fd is not None:
        check_vhost_vsock_fd(vhost_fd, f"vhostfd={vhost_fd}")
    else:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VhostVsockError(f"vhost-vsock needs {path}, which does not exist on this host "
                                  "(its kernel has no vhost_vsock module loaded).") from None
        except OSError as err:
            raise VhostVsockError(f"Cannot open {path}: {err.strerror or err}.") from None
        try:
            check_vhost_vsock_fd(fd, path)
        finally:
            os.close(fd)
    raise VhostVsockError(f"vhost-vsock (guest-cid={guest_cid}) is not supported by this VMM: its "
                          "device and vhost data path are not implemented (they could not be "
                          "tested on the development host, which has no vhost modules).")
