"""Tests of the host chardevs (pystratovirt.devices.chardev) on a real event loop run by the test:
a real UNIX socket and clients, a real pty, pipes standing in for stdio, a real file."""

from __future__ import annotations

import os
import socket
import stat
import time

import pytest

from pystratovirt.devices.chardev import (
    MAX_BACKLOG,
    MAX_BUFFERED,
    ChardevConfig,
    ChardevError,
    FileChardev,
    PtyChardev,
    SocketChardev,
    StdioChardev,
    open_chardev,
)
from pystratovirt.util.eventloop import EventLoop

pytestmark = pytest.mark.timeout(60)


class Owner:
    """Plays the device: counts on_input calls and reads what it is offered when it wants to."""

    def __init__(self, dev, take: bool = True):
        self.dev = dev
        self.take = take
        self.calls = 0
        self.got = bytearray()

    def on_input(self) -> None:
        self.calls += 1
        if self.take:
            while data := self.dev.read(4096):
                self.got += data


@pytest.fixture
def loop():
    lp = EventLoop("test-chardev")
    lp.thread_id = None
    yield lp
    lp.close()


def pump(loop: EventLoop, until=lambda: False, timeout: float = 2.0) -> bool:
    """Run the loop on this thread until ``until()`` or the timeout; returns ``until()``."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        loop.run_once(0.02)
    return until()


def connect(path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(path))
    c.settimeout(2)
    return c


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


# -- socket -------------------------------------------------------------------------------------------
def test_socket_file_mode_refusal_and_removal(tmp_path):
    path = tmp_path / "console.sock"
    dev = SocketChardev("con0", str(path))
    assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(ChardevError) as err:
        SocketChardev("con1", str(path))
    assert err.value.desc == (f"The socket path '{path}' of chardev 'con1' already exists; remove it or "
                              "choose another path.")
    dev.close()
    assert not path.exists()
    # A file someone put in its place is not ours to remove.
    dev = SocketChardev("con0", str(path))
    os.unlink(path)
    path.write_text("someone else's")
    dev.close()
    assert path.read_text() == "someone else's"


def test_socket_output_without_client_is_dropped_then_flows(loop, tmp_path):
    path = tmp_path / "c.sock"
    dev = SocketChardev("con0", str(path))
    dev.attach(loop, Owner(dev).on_input)
    dev.write(b"nobody hears this")
    assert dev.stats.dropped == 17 and dev.stats.bytes_out == 0
    client = connect(path)
    assert pump(loop, lambda: dev.connected)
    dev.write(b"hello\n")
    assert recv_exactly(client, 6) == b"hello\n"
    assert dev.stats.bytes_out == 6 and dev.stats.connections == 1
    client.close()
    dev.close()


def test_a_client_that_does_not_read_costs_bounded_memory(loop, tmp_path):
    path = tmp_path / "c.sock"
    dev = SocketChardev("con0", str(path))
    dev.attach(loop, Owner(dev).on_input)
    client = connect(path)
    pump(loop, lambda: dev.connected)
    chunk = b"x" * 4096
    started = time.monotonic()
    for _ in range(1024):   # 4 MiB: far beyond the socket buffer and ours
        dev.write(chunk)
    assert time.monotonic() - started < 2          # never blocked
    assert dev.buffered <= MAX_BUFFERED
    assert dev.stats.dropped > 0
    assert dev.stats.bytes_out + dev.buffered + dev.stats.dropped == 4 << 20
    # The client reads after all: the buffered part arrives, in order, with nothing torn.
    client.setblocking(False)
    got = bytearray()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (dev.buffered or len(got) < dev.stats.bytes_out):
        loop.run_once(0.01)
        try:
            got += client.recv(1 << 20)
        except BlockingIOError:
            pass
    assert dev.buffered == 0 and len(got) == dev.stats.bytes_out and set(got) == {ord("x")}
    client.close()
    dev.close()


def test_input_only_while_wanted(loop, tmp_path):
    path = tmp_path / "c.sock"
    dev = SocketChardev("con0", str(path))
    owner = Owner(dev)
    dev.attach(loop, owner.on_input)
    client = connect(path)
    pump(loop, lambda: dev.connected)
    client.sendall(b"typed early")
    pump(loop, timeout=0.3)
    assert owner.calls == 0 and dev.stats.bytes_in == 0   # left in the socket: back-pressure
    dev.want_input(True)
    assert pump(loop, lambda: owner.got == b"typed early")
    dev.want_input(False)
    client.sendall(b"later")
    pump(loop, timeout=0.3)
    assert owner.got == b"typed early"
    dev.want_input(True)
    assert pump(loop, lambda: owner.got == b"typed earlylater")
    client.close()
    dev.close()


def test_one_client_at_a_time_the_next_waits(loop, tmp_path):
    path = tmp_path / "c.sock"
    dev = SocketChardev("con0", str(path))
    dev.attach(loop, Owner(dev).on_input)
    first = connect(path)
    pump(loop, lambda: dev.connected)
    second = connect(path)            # accepted by the kernel's backlog, not by us
    pump(loop, timeout=0.3)
    dev.write(b"one")
    assert recv_exactly(first, 3) == b"one"
    first.close()
    assert pump(loop, lambda: dev.stats.connections == 2)
    dev.write(b"two")
    assert recv_exactly(second, 3) == b"two"
    second.close()
    dev.close()


def test_input_of_a_client_that_left_is_kept(loop, tmp_path):
    """``echo cmd | nc -U sock``: the client sends and hangs up before the guest takes it."""
    path = tmp_path / "c.sock"
    dev = SocketChardev("con0", str(path))
    owner = Owner(dev)
    dev.attach(loop, owner.on_input)
    client = connect(path)
    pump(loop, lambda: dev.connected)
    client.sendall(b"reboot\n")
    client.close()
    assert pump(loop, lambda: not dev.connected)
    dev.want_input(True)
    assert pump(loop, lambda: owner.got == b"reboot\n")
    # And the socket takes a new client afterwards.
    again = connect(path)
    assert pump(loop, lambda: dev.connected)
    again.sendall(b"more")
    assert pump(loop, lambda: owner.got == b"reboot\nmore")
    again.close()
    dev.close()


def test_backlog_is_bounded_and_offered_piecewise(loop, tmp_path):
    path = tmp_path / "c.sock"
    dev = SocketChardev("con0", str(path))
    owner = Owner(dev, take=False)
    dev.attach(loop, owner.on_input)
    client = connect(path)
    pump(loop, lambda: dev.connected)
    client.setblocking(False)
    sent = 0
    try:
        while sent < 4 * MAX_BACKLOG:
            sent += client.send(b"y" * 4096)
    except BlockingIOError:
        pass
    client.close()
    assert pump(loop, lambda: not dev.connected)
    dev.want_input(True)
    pump(loop, lambda: owner.calls > 0)
    taken = b""
    while len(taken) < MAX_BACKLOG:      # the owner takes 1 KiB per offer
        part = dev.read(1024)
        if not part:
            assert pump(loop, lambda: owner.calls > 1)
            continue
        taken += part
    assert taken == b"y" * MAX_BACKLOG and dev.read(1024) == b""
    dev.close()


# -- pty --------------------------------------------------------------------------------------------
def test_pty_path_is_announced_and_carries_bytes(loop, capsys):
    dev = PtyChardev("charpty")
    assert f"char device redirected to {dev.path} (label charpty)" in capsys.readouterr().err
    assert dev.path.startswith("/dev/pts/")
    owner = Owner(dev)
    dev.attach(loop, owner.on_input)
    user = os.open(dev.path, os.O_RDWR | os.O_NOCTTY)
    try:
        dev.write(b"guest says\r\n")
        assert os.read(user, 100) == b"guest says\r\n"   # raw: nothing rewritten or echoed
        dev.want_input(True)
        os.write(user, b"user types")
        assert pump(loop, lambda: owner.got == b"user types")
    finally:
        os.close(user)
        dev.close()


def test_pty_nobody_attached_never_blocks(loop):
    dev = PtyChardev("charpty")
    dev.attach(loop, Owner(dev).on_input)
    started = time.monotonic()
    for _ in range(256):
        dev.write(b"z" * 4096)
    assert time.monotonic() - started < 2 and dev.buffered <= MAX_BUFFERED and dev.stats.dropped > 0
    dev.close()


# -- stdio (pipes standing in for the VMM's stdin and stdout) ----------------------------------------
def test_stdio_pipes_and_end_of_input(loop):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    dev = StdioChardev("stdio", in_r, out_w)
    owner = Owner(dev)
    dev.attach(loop, owner.on_input)
    dev.write(b"to stdout")
    assert os.read(out_r, 100) == b"to stdout"
    dev.want_input(True)
    os.write(in_w, b"from stdin")
    os.close(in_w)
    assert pump(loop, lambda: owner.got == b"from stdin")
    assert pump(loop, lambda: not dev._reading)       # EOF ends input; no busy loop afterwards
    calls = owner.calls
    pump(loop, timeout=0.2)
    assert owner.calls == calls
    # stdout's reader goes away: output is dropped from then on, never an error.
    os.close(out_r)
    dev.write(b"lost")
    dev.write(b"lost too")
    assert dev.stats.dropped == 12
    dev.close()
    for fd in (in_r, out_w):
        os.close(fd)


# -- file ---------------------------------------------------------------------------------------------
def test_file_appends_and_has_no_input(loop, tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"earlier run\n")
    dev = open_chardev(ChardevConfig("log", "file", str(path)))
    assert isinstance(dev, FileChardev)
    owner = Owner(dev)
    dev.attach(loop, owner.on_input)
    dev.want_input(True)
    dev.write(b"boot log\n")
    pump(loop, timeout=0.2)
    assert owner.calls == 0 and dev.read(10) == b""
    dev.close()
    assert path.read_bytes() == b"earlier run\nboot log\n"
    new = tmp_path / "new.log"
    open_chardev(ChardevConfig("log2", "file", str(new))).close()
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o600


@pytest.mark.parametrize("config, message", [
    (ChardevConfig("c", "telnet", "x"), "Chardev 'c' has backend 'telnet'; the backends are socket, pty, stdio, file."),
    (ChardevConfig("c", "socket", None), "Chardev 'c' (socket) needs a path."),
    (ChardevConfig("c", "file", ""), "Chardev 'c' (file) needs a path."),
    (ChardevConfig("c", "file", "/nonexistent-dir/x.log"),
     "Cannot open the file '/nonexistent-dir/x.log' of chardev 'c': No such file or directory."),
    (ChardevConfig("c", "socket", "/nonexistent-dir/x.sock"),
     "Cannot create the socket '/nonexistent-dir/x.sock' of chardev 'c': No such file or directory."),
    (ChardevConfig("c", "socket", "/tmp/" + "s" * 120),
     "Cannot create the socket '/tmp/" + "s" * 120 + "' of chardev 'c': AF_UNIX path too long."),
])
def test_open_errors_are_one_sentence(config, message):
    with pytest.raises(ChardevError) as err:
        open_chardev(config)
    assert err.value.desc == message
