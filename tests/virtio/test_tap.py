"""Tests of opening and adopting tap devices (pystratovirt.virtio.tap), with real taps inside a
network namespace each test session creates and deletes (nothing touches the host's own
interfaces), and of the vhost-net refusal.

The namespace helper (:class:`NetNs`) lives in tests/helpers/netns.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import sys

import pytest

from helpers.netns import NetNs
from pystratovirt.virtio import tap as tapmod
from pystratovirt.virtio import vhost_net
from pystratovirt.virtio.tap import Tap, TapError

TUNGETVNETHDRSZ = 0x800454D7


def vnet_hdr_size(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0]


# -- opening by name --------------------------------------------------------------------------------
def test_open_existing_tap(ns):
    ns.add_tap("tap0")
    tap = ns.open_tap("tap0")
    try:
        assert tap.ifname == "tap0" and tap.fd >= 0
        assert not os.get_blocking(tap.fd)
        assert vnet_hdr_size(tap.fd) == 12
        assert fcntl.fcntl(tap.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert tap.attached()
        tap.set_offload(tapmod.TUN_F_CSUM | tapmod.TUN_F_TSO4 | tapmod.TUN_F_TSO6)
        tap.set_offload(0)
        with pytest.raises(BlockingIOError):
            os.read(tap.fd, 2048)   # nothing queued, never blocks
    finally:
        tap.close()
    assert tap.closed
    tap.close()  # idempotent
    # A persistent tap survives our detach.
    assert "tap0" in ns.ip("link", "show", "tap0").stdout


def test_unknown_tap_is_an_error_and_creates_nothing(ns):
    with pytest.raises(TapError, match=r"^Tap device 'nosuchtap' does not exist\.$"):
        ns.open_tap("nosuchtap")
    assert ns.ip("link", "show", "nosuchtap", check=False).returncode != 0


def test_tap_in_another_namespace_is_unknown(ns):
    # The name is looked up in the caller's namespace only; the test's tap is not in ours.
    ns.add_tap("pstvonly0")
    with pytest.raises(TapError, match="does not exist"):
        Tap.open("pstvonly0")


def test_not_a_tap(ns):
    with pytest.raises(TapError, match=r"^Network interface 'lo' is not a tap device\.$"):
        ns.open_tap("lo")
    ns.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    with pytest.raises(TapError, match=r"'veth0' is not a tap device"):
        ns.open_tap("veth0")
    ns.add_tap("tun0", mode="tun")
    with pytest.raises(TapError, match=r"^Network interface 'tun0' is a tun \(layer 3\) device, not a tap\.$"):
        ns.open_tap("tun0")


def test_tap_busy(ns):
    ns.add_tap("tap0")
    first = ns.open_tap("tap0")
    try:
        with pytest.raises(TapError, match=r"^Tap device 'tap0' is busy: another process is already attached to it\.$"):
            ns.open_tap("tap0")
    finally:
        first.close()
    ns.open_tap("tap0").close()  # free again once the first user let go


def test_multi_queue_tap_is_refused_clearly(ns):
    ns.add_tap("mq0", "multi_queue")
    with pytest.raises(TapError, match="multi_queue"):
        ns.open_tap("mq0")


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", "a:b", "a b", ".."])
def test_invalid_names(name):
    with pytest.raises(TapError, match="is not a valid network interface name"):
        Tap.open(name)


def test_missing_dev_net_tun(ns, monkeypatch, tmp_path):
    ns.add_tap("tap0")
    monkeypatch.setattr(tapmod, "TUN_PATH", str(tmp_path / "tun"))
    with pytest.raises(TapError, match=r"/tun does not exist: this host has no tun/tap support"):
        ns.open_tap("tap0")


def _run_without_capabilities(ns: NetNs, code: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` inside the namespace as root with every capability dropped."""
    return ns.exec("setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code,
                   check=False)


def test_permission_denied_attaching(ns):
    # A tap owned by another user refuses a process without CAP_NET_ADMIN.
    ns.add_tap("tap0", "user", "4242")
    result = _run_without_capabilities(ns, (
        "from pystratovirt.virtio.tap import Tap, TapError\n"
        "try:\n    Tap.open('tap0')\nexcept TapError as e:\n    print(e)\n"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("Permission denied attaching to tap device 'tap0' (it belongs to "
                                     "another user or group, and CAP_NET_ADMIN is needed).")


def test_permission_denied_opening_tun(ns, tmp_path):
    ns.add_tap("tap0")
    fake = tmp_path / "tun"
    fake.write_bytes(b"")
    fake.chmod(0)
    tmp_path.chmod(0o755)
    result = _run_without_capabilities(ns, (
        "from pystratovirt.virtio import tap\n"
        f"tap.TUN_PATH = {str(fake)!r}\n"
        "try:\n    tap.Tap.open('tap0')\nexcept tap.TapError as e:\n    print(e)\n"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"Permission denied opening {fake}."


# -- adopting a descriptor --------------------------------------------------------------------------
def _raw_attach(ns: NetNs, name: str, flags: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    with ns.entered():
        fcntl.ioctl(fd, tapmod.TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    return fd


def test_from_fd(ns):
    ns.add_tap("tap0")
    fd = _raw_attach(ns, "tap0", tapmod.IFF_TAP | tapmod.IFF_NO_PI | tapmod.IFF_VNET_HDR)
    tap = Tap.from_fd(fd)
    try:
        assert tap.fd == fd and tap.ifname == "tap0"
        assert not os.get_blocking(fd)
        assert vnet_hdr_size(fd) == 12
    finally:
        tap.close()


def test_from_fd_refusals(ns):
    ns.add_tap("tap0")
    ns.add_tap("tun0", mode="tun")
    r, w = os.pipe()
    try:
        with pytest.raises(TapError, match=rf"^File descriptor {r} is not a tap device\.$"):
            Tap.from_fd(r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(TapError, match=rf"^File descriptor {r} is not open\.$"):
        Tap.from_fd(r)
    unattached = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        with pytest.raises(TapError, match="is a tun/tap file that is not attached to any interface"):
            Tap.from_fd(unattached)
    finally:
        os.close(unattached)
    for name, flags, message in (
            ("tap0", tapmod.IFF_TAP | tapmod.IFF_NO_PI, "was opened without IFF_VNET_HDR"),
            ("tun0", tapmod.IFF_TUN | tapmod.IFF_NO_PI | tapmod.IFF_VNET_HDR, "is a tun \\(layer 3\\) device")):
        fd = _raw_attach(ns, name, flags)
        try:
            with pytest.raises(TapError, match=message):
                Tap.from_fd(fd)
        finally:
            os.close(fd)   # a refused descriptor stays the caller's


def test_attached_turns_false_when_the_tap_is_deleted(ns):
    ns.add_tap("tap0")
    tap = ns.open_tap("tap0")
    try:
        ns.delete_link("tap0")
        assert not tap.attached()
        with pytest.raises(OSError) as info:
            os.read(tap.fd, 2048)
        assert info.value.errno == errno.EBADFD
    finally:
        tap.close()


# -- vhost-net --------------------------------------------------------------------------------------
def test_vhost_net_is_refused_with_the_reason(tmp_path):
    missing = str(tmp_path / "vhost-net")
    with pytest.raises(vhost_net.VhostNetError, match=r"needs .*vhost-net, which does not exist on this host"):
        vhost_net.open_vhost_net(path=missing)
    present = tmp_path / "present"
    present.write_bytes(b"")
    with pytest.raises(vhost_net.VhostNetError, match=r"data path is not implemented"):
        vhost_net.open_vhost_net(path=str(present))
    with pytest.raises(vhost_net.VhostNetError, match=r"^vhostfds=7 was given"):
        vhost_net.open_vhost_net(7)
    if not os.path.exists(vhost_net.VHOST_NET_PATH):
        assert "does not exist" in vhost_net.unavailable_reason()
