"""The host side of a NIC: a Linux tap device opened through /dev/net/tun (see <linux/if_tun.h>).

Owns: attaching to an existing tap by name (:meth:`Tap.open`) or adopting an already attached
tap file descriptor (:meth:`Tap.from_fd`), the per-file settings the virtio-net data path relies
on (non-blocking, a 12-byte little-endian vnet header, the offloads the guest negotiated), and
the one-sentence :class:`TapError` a user sees when that fails.

Every frame read from or written to the file starts with a 12-byte ``struct virtio_net_hdr_v1``
(the 10-byte ``virtio_net_hdr`` plus ``num_buffers``), which is exactly the header a virtio 1.x
guest puts in front of its frames, so the device moves frames between the guest and the tap
without re-encoding them. The tap fills in only the first 10 bytes on a read; the device sets
``num_buffers`` itself.

Opening by name never creates an interface. TUNSETIFF on a name that is not a tap would create
a new (non-persistent) one, which would silently give the guest a NIC connected to nothing, so
:meth:`Tap.open` first checks that the interface exists in the caller's network namespace and
is a tap (ethtool reports driver "tun", bus "tap": namespace-correct, unlike /sys/class/net,
which shows the namespace sysfs was mounted in), and afterwards that the interface index did
not change (a tap deleted and re-created in between would otherwise be accepted).

The file is opened without IFF_MULTI_QUEUE: one tap, one queue pair. A tap created with
``multi_queue`` refuses such an attach (EINVAL) and the error says so.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import PyStratoVirtError
from .vhost_net import open_vhost_net

TUN_PATH = "/dev/net/tun"
VNET_HDR_LEN = 12       # sizeof(struct virtio_net_hdr_v1): what virtio 1.x guests use
IFNAMSIZ = 16

# ioctl numbers (<linux/if_tun.h>, _IOW/_IOR('T', n, int)), checked against the C headers.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETSNDBUF = 0x400454D4
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_TYPE_MASK = 0x000F
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# TUNSETOFFLOAD flags: what the tap may hand us (partially checksummed / TSO frames).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO_SIZE = 196      # sizeof(struct ethtool_drvinfo)
_DRVINFO_DRIVER = slice(4, 36)
_DRVINFO_BUS_INFO = slice(100, 132)

_IFREQ = struct.Struct("16sH22x")          # ifr_name, ifr_flags (struct ifreq is 40 bytes)
_IFREQ_DATA = struct.Struct("16sP16x")     # ifr_name, ifr_data pointer


class TapError(PyStratoVirtError):
    """A tap cannot be used; the message is one sentence for the user."""


@dataclass(frozen=True)
class NetdevConfig:
    """A NIC's host side as the user named it: the backend of one net slot.

    One spec for every way a tap comes to be: ``-netdev``, the ``-config`` file's ``net``
    entries and QMP's ``netdev_add``. ``ifname`` names an existing tap; ``fds`` are references
    to descriptors the VMM was given (a number inherited at start, or a QMP ``getfd`` name),
    one per queue; ``vhost``/``vhostfds`` ask for the in-kernel data path. The parsers check
    the syntax; :meth:`Tap.from_config` opens it.
    """

    id: str
    ifname: str | None = None
    fds: tuple[str, ...] = ()
    vhost: bool = False
    vhostfds: tuple[str, ...] = ()


def _valid_ifname(name: str) -> bool:
    # The kernel's dev_valid_name(): 1..15 bytes, not "." or "..", no '/', ':' or whitespace.
    raw = name.encode("utf-8", "surrogateescape")
    return (0 < len(raw) < IFNAMSIZ and name not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in name))


def _interface_index(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _tun_kind(name: str) -> str | None:
    """"tap" or "tun" for a tun/tap interface, None for any other kind (ethtool driver info)."""
    info = ctypes.create_string_buffer(struct.pack("I", ETHTOOL_GDRVINFO).ljust(_DRVINFO_SIZE, b"\0"))
    ifr = _IFREQ_DATA.pack(name.encode(), ctypes.addressof(info))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)
    except OSError:
        return None  # EOPNOTSUPP: a driver without ethtool support is no tap either
    raw = info.raw
    if raw[_DRVINFO_DRIVER].rstrip(b"\0") != b"tun":
        return None
    bus = raw[_DRVINFO_BUS_INFO].rstrip(b"\0")
    return bus.decode() if bus in (b"tap", b"tun") else None


class Tap:
    """An attached tap file (owned: :meth:`close` closes it).

    The constructor adopts ``fd`` as it is; use :meth:`open` or :meth:`from_fd`, which check
    and configure it.
    """

    def __init__(self, fd: int, ifname: str):
        self.fd = fd
        self.ifname = ifname

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, ifname: str) -> Tap:
        """Attach to the existing tap ``ifname``; raises TapError."""
        if not _valid_ifname(ifname):
            raise TapError(f"'{ifname}' is not a valid network interface name.")
        if not os.path.exists(TUN_PATH):
            raise TapError(f"{TUN_PATH} does not exist: this host has no tun/tap support "
                           "(load the tun module).")
        index = _interface_index(ifname)
        if index is None:
            raise TapError(f"Tap device '{ifname}' does not exist.")
        kind = _tun_kind(ifname)
        if kind is None:
            raise TapError(f"Network interface '{ifname}' is not a tap device.")
        if kind == "tun":
            raise TapError(f"Network interface '{ifname}' is a tun (layer 3) device, not a tap.")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise TapError(f"Permission denied opening {TUN_PATH}.") from None
            if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                raise TapError(f"{TUN_PATH} does not exist: this host has no tun/tap support "
                               "(load the tun module).") from None
            raise TapError(f"Cannot open {TUN_PATH}: {exc.strerror}.") from None
        try:
            try:
                fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            except OSError as exc:
                raise TapError(_attach_error(ifname, exc)) from None
            if _interface_index(ifname) != index:
                # Deleted between the check and TUNSETIFF, which then created a new tap: closing
                # our file removes that one again.
                raise TapError(f"Tap device '{ifname}' disappeared while it was being opened.")
            tap = cls(fd, ifname)
            tap._configure()
            return tap
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_config(cls, config: NetdevConfig, take_fd: Callable[[str], int]) -> Tap:
        """Open the tap ``config`` names: by name, or by adopting the descriptor ``take_fd``
        hands over for its one ``fds`` reference (ownership passes to the tap only once it is
        accepted; a refused descriptor is closed, since the caller gave it up). Raises TapError,
        or VhostNetError when the in-kernel data path is asked for."""
        if config.vhost or config.vhostfds:
            open_vhost_net(config.vhostfds[0] if config.vhostfds else None)
        if not config.fds:
            if config.ifname is None:
                raise TapError(f"Netdev '{config.id}' names neither a tap (ifname) nor a descriptor (fds).")
            return cls.open(config.ifname)
        if len(config.fds) > 1:
            raise TapError(f"Netdev '{config.id}' passes {len(config.fds)} tap descriptors: multi-queue "
                           "taps are not supported, pass one.")
        fd = take_fd(config.fds[0])
        try:
            return cls.from_fd(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int) -> Tap:
        """Adopt a tap file descriptor someone else attached (``fds=``); takes ownership of it
        once this returns (a refused descriptor stays the caller's). It must be a tap opened with
        IFF_NO_PI and IFF_VNET_HDR."""
        try:
            raw = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise TapError(f"File descriptor {fd} is not open.") from None
            if exc.errno == errno.EBADFD:
                raise TapError(f"File descriptor {fd} is a tun/tap file that is not attached to "
                               "any interface.") from None
            raise TapError(f"File descriptor {fd} is not a tap device.") from None
        name_raw, flags = _IFREQ.unpack(raw)
        ifname = name_raw.split(b"\0", 1)[0].decode(errors="replace")
        if flags & IFF_TYPE_MASK != IFF_TAP:
            raise TapError(f"File descriptor {fd} ('{ifname}') is a tun (layer 3) device, not a tap.")
        # IFF_NO_PI cannot be checked: TUNGETIFF reports IFF_NOFILTER ("no socket filter"), the
        # same bit, in its place. A descriptor opened without it would prepend 4 bytes of packet
        # information; the caller's side of the ``fds=`` contract, as with any VMM.
        if not flags & IFF_VNET_HDR:
            raise TapError(f"Tap file descriptor {fd} ('{ifname}') was opened without IFF_VNET_HDR.")
        try:
            os.set_blocking(fd, False)
        except OSError as exc:
            raise TapError(f"Cannot make tap file descriptor {fd} non-blocking: {exc.strerror}.") from None
        tap = cls(fd, ifname)
        tap._configure()
        return tap

    def _configure(self) -> None:
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as exc:
            raise TapError(f"Tap device '{self.ifname}' refused a {VNET_HDR_LEN}-byte vnet header: "
                           f"{exc.strerror}.") from None
        try:
            # virtio 1.x headers are little-endian. On a little-endian host that is the tap's
            # default anyway, and a kernel without TUNSETVNETLE is fine; elsewhere it is required.
            fcntl.ioctl(self.fd, TUNSETVNETLE, struct.pack("i", 1))
        except OSError as exc:
            if sys.byteorder != "little":
                raise TapError(f"Tap device '{self.ifname}' cannot use little-endian vnet headers: "
                               f"{exc.strerror}.") from None
        try:
            # No offloads until a guest negotiates them: frames queued before then arrive fully
            # checksummed and segmented, which every guest accepts.
            self.set_offload(0)
        except OSError as exc:
            raise TapError(f"Tap device '{self.ifname}' refused its offload settings: {exc.strerror}.") from None

    # -- settings and life cycle ------------------------------------------------------------------
    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: which TUN_F_* kinds of frames the tap may hand us; raises OSError."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def attached(self) -> bool:
        """False once the interface behind the file is gone (deleted, or moved away)."""
        try:
            fcntl.ioctl(self.fd, TUNGETIFF, bytes(_IFREQ.size))
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"Tap({self.ifname!r}, fd={self.fd})"


def _attach_error(ifname: str, exc: OSError) -> str:
    if exc.errno == errno.EBUSY:
        return f"Tap device '{ifname}' is busy: another process is already attached to it."
    if exc.errno in (errno.EPERM, errno.EACCES):
        return (f"Permission denied attaching to tap device '{ifname}' (it belongs to another "
                "user or group, and CAP_NET_ADMIN is needed).")
    if exc.errno == errno.EINVAL:
        return (f"Tap device '{ifname}' cannot be attached as a single-queue tap with vnet "
                "headers (was it created with multi_queue?).")
    return f"Cannot attach to tap device '{ifname}': {exc.strerror}."
