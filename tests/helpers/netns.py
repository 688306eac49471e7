"""Network namespaces owned by a test: a named namespace (``ip netns add``) with IPv6 disabled,
so the kernel sends no router solicitations of its own on the taps, and ``entered()`` to run a
few calls (opening a tap by name, binding a packet socket) inside it on the calling thread only
(setns(2) is per thread). Tests talk only to interfaces inside namespaces they made.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import subprocess
import time
from contextlib import contextmanager

from pystratovirt.virtio.tap import Tap

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
_libc = ctypes.CDLL(None, use_errno=True)
_names = itertools.count()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetNs:
    """A network namespace owned by a test; ``close()`` deletes it and everything in it."""

    def __init__(self) -> None:
        self.name = f"pstv-test-{os.getpid()}-{next(_names)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.default.disable_ipv6=1")

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], check=check,
                              capture_output=True, text=True)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "-n", self.name, *args], check=check, capture_output=True, text=True)

    def add_tap(self, name: str, *extra: str, up: bool = True, mode: str = "tap") -> str:
        self.ip("tuntap", "add", "dev", name, "mode", mode, *extra)
        if up:
            self.ip("link", "set", name, "up")
        return name

    def delete_link(self, name: str) -> None:
        self.ip("link", "del", name)

    @contextmanager
    def entered(self):
        """Run the body inside the namespace (this thread only)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    yield self
                finally:
                    _setns(own)
            finally:
                os.close(target)
        finally:
            os.close(own)

    def open_tap(self, name: str) -> Tap:
        with self.entered():
            return Tap.open(name)

    def packet_socket(self, ifname: str) -> socket.socket:
        """A raw socket on ``ifname`` (every frame, both ways), 10 s receive timeout."""
        with self.entered():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((ifname, 0))
        s.settimeout(10)
        return s

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def recv_from_guest(s: socket.socket, ethertype: int, timeout: float = 10) -> bytes:
    """The next frame of ``ethertype`` on a packet socket (others are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = s.recv(65536)
        if len(frame) >= 14 and int.from_bytes(frame[12:14], "big") == ethertype:
            return frame
    raise AssertionError(f"no frame of type {ethertype:#x} from the guest")
