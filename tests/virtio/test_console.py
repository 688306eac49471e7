"""Tests of the virtio-console device (pystratovirt.virtio.console) behind the virtio-mmio transport,
on its own I/O thread, with the test-side driver playing the guest and real chardevs on the host
side: a UNIX socket with a real client, and a file."""

from __future__ import annotations

import os
import socket
import time

import pytest

from pystratovirt.devices.chardev import MAX_BUFFERED, FileChardev, SocketChardev
from pystratovirt.virtio import mmio as r
from pystratovirt.virtio.console import (
    CONFIG,
    MAX_TX_CHAIN,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_ID_CONSOLE,
    VirtioConsole,
)
from pystratovirt.virtio.device import bit
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import DriverError, VirtioDriver
from virtio.helper import spied_memory

MEM = 32 << 20
RX, TX = 0, 1
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mem():
    yield from spied_memory(MEM)


class Guest:
    """The guest's virtio_console driver for port 0."""

    def __init__(self, dev: VirtioConsole, mem):
        self.dev = dev
        self.t = VirtioMmio(dev, mem)
        self.t.start()
        self.mem = mem
        self.drv = VirtioDriver(self.t, mem, data_size=0x100_0000)
        self.features = self.drv.initialize()
        self.rx: dict[int, int] = {}

    def send(self, data: bytes, pieces: int = 1) -> None:
        addr = self.drv.put(data)
        step = -(-len(data) // pieces)
        head = self.drv.submit(TX, [(addr + o, min(step, len(data) - o)) for o in range(0, len(data), step)], [])
        self.drv.notify(TX)
        assert self.drv.wait_used(TX, 1) == [(head, 0)]

    def post_rx(self, count: int, size: int) -> None:
        for _ in range(count):
            addr = self.drv.alloc(size)
            self.rx[self.drv.submit(RX, [], [(addr, size)])] = addr
        self.drv.notify(RX)

    def received(self, count: int, timeout: float = 5.0) -> bytes:
        out = b""
        for head, n in self.drv.wait_used(RX, count, timeout):
            out += self.mem.read(self.rx.pop(head), n)
        return out

    def close(self) -> None:
        self.t.close(timeout=5)


@pytest.fixture
def sock_guest(mem, tmp_path):
    """(guest, client socket, path): a console on a socket chardev with a client connected."""
    path = tmp_path / "console.sock"
    dev = VirtioConsole(SocketChardev("con0", str(path)), name="console0")
    guest = Guest(dev, mem)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    client.settimeout(5)
    deadline = time.monotonic() + 5
    while not dev.chardev.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    yield guest, client, path
    client.close()
    guest.close()


def recv_exactly(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_identity_features_and_config(sock_guest):
    guest, _, _ = sock_guest
    drv = guest.drv
    assert drv.rd(r.DEVICE_ID) == VIRTIO_ID_CONSOLE == 3
    assert not guest.features & bit(VIRTIO_CONSOLE_F_MULTIPORT)
    assert len(drv.queues) == 2   # receiveq and transmitq of port 0, no control queues
    assert [drv.read_config(o, 4) for o in range(0, CONFIG.size, 4)] == [0, 0, 0]


def test_guest_output_reaches_the_client(sock_guest):
    guest, client, _ = sock_guest
    guest.send(b"Linux version 6.1\r\n")
    guest.send(b"split across several buffers\r\n", pieces=5)
    want = b"Linux version 6.1\r\nsplit across several buffers\r\n"
    assert recv_exactly(client, len(want)) == want
    assert guest.dev.stats.tx_bytes == len(want)


def test_host_input_with_back_pressure(sock_guest):
    """The chardev is read only while the guest has receive buffers; nothing is lost."""
    guest, client, _ = sock_guest
    data = os.urandom(10_000)
    client.sendall(data)
    time.sleep(0.2)
    assert guest.dev.chardev.stats.bytes_in == 0        # no buffers yet: left in the socket
    got = b""
    while len(got) < len(data):
        guest.post_rx(1, 1024)
        got += guest.received(1)
        # Exactly what the guest had room for was taken from the socket, no more.
        assert guest.dev.chardev.stats.bytes_in == len(got)
    assert got == data
    assert guest.dev.stats.rx_bytes == len(data)


def test_no_client_output_is_dropped_and_the_guest_goes_on(mem, tmp_path):
    dev = VirtioConsole(SocketChardev("con0", str(tmp_path / "c.sock")))
    guest = Guest(dev, mem)
    try:
        guest.send(b"boot messages nobody reads\n")
        assert dev.chardev.stats.dropped == 27 and dev.stats.tx_bytes == 27
    finally:
        guest.close()
    assert not (tmp_path / "c.sock").exists()


def test_a_client_that_stops_reading_does_not_block_the_guest(sock_guest):
    guest, client, _ = sock_guest
    started = time.monotonic()
    for _ in range(256):                 # 1 MiB in 4 KiB chains
        guest.send(b"q" * 4096)
    assert time.monotonic() - started < 20
    stats = guest.dev.chardev.stats
    assert guest.dev.chardev.buffered <= MAX_BUFFERED and stats.dropped > 0
    assert stats.bytes_out + guest.dev.chardev.buffered + stats.dropped == 1 << 20


def test_oversized_transmit_chain_is_cut(mem, tmp_path):
    log = tmp_path / "out.log"
    dev = VirtioConsole(FileChardev("log", str(log)))
    guest = Guest(dev, mem)
    try:
        size = MAX_TX_CHAIN + 4096
        addr = guest.drv.alloc(size)
        mem.fill(addr, size, ord("a"))
        head = guest.drv.submit(TX, [(addr, size)], [])
        guest.drv.notify(TX)
        assert guest.drv.wait_used(TX, 1) == [(head, 0)]
        assert dev.stats.tx_bytes == MAX_TX_CHAIN and dev.stats.tx_dropped == 4096
    finally:
        guest.close()
    assert log.stat().st_size == MAX_TX_CHAIN


def test_file_chardev_gets_the_output(mem, tmp_path):
    log = tmp_path / "console.log"
    guest = Guest(VirtioConsole(FileChardev("log", str(log))), mem)
    try:
        guest.send(b"hello file\n")
        guest.post_rx(2, 64)               # a file has no input: the buffers just wait
        with pytest.raises(DriverError):
            guest.received(1, timeout=0.3)
    finally:
        guest.close()
    assert log.read_bytes() == b"hello file\n"


def test_reset_forgets_receive_buffers_and_stops_reading(sock_guest):
    guest, client, _ = sock_guest
    guest.post_rx(2, 64)
    deadline = time.monotonic() + 5
    while guest.dev.receive_buffers != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guest.dev.chardev.input_wanted
    guest.drv.wr(r.STATUS, 0)
    assert guest.dev.receive_buffers == 0 and not guest.dev.chardev.input_wanted
    client.sendall(b"after reset")
    time.sleep(0.2)
    assert guest.dev.chardev.stats.bytes_in == 0
    # A new driver gets the bytes.
    guest.drv.initialize()
    guest.rx.clear()
    guest.post_rx(1, 64)
    assert guest.received(1) == b"after reset"


def test_chain_without_writable_bytes_returned_empty(sock_guest):
    guest, client, _ = sock_guest
    out = guest.drv.put(b"x")
    head = guest.drv.submit(RX, [(out, 1)], [])
    guest.drv.notify(RX)
    assert guest.drv.wait_used(RX, 1) == [(head, 0)]
    assert not guest.dev.needs_reset
