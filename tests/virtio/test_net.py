"""Tests of the virtio-net device (pystratovirt.virtio.net) behind the virtio-mmio transport, with
the test-side driver playing the guest and a REAL tap on the host side.

Each test gets its own network namespace (see helpers/netns.py) holding a tap; the VMM side opens
the tap by name inside it, and the other end of the wire is an AF_PACKET socket bound to the same
interface: what the guest transmits shows up on that socket, and what the socket sends comes out
of the tap into the guest. Frames are raw Ethernet with the local experimental EtherType 0x88B5;
the offload tests carry TCP/IPv4 between documentation addresses (192.0.2.0/24) that exist only
in these frames -- no interface has an address, and nothing leaves the namespace.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import select
import socket
import struct
import time

import pytest

from helpers.netns import NetNs
from pystratovirt.virtio import mmio as r
from pystratovirt.virtio import net as netmod
from pystratovirt.virtio.device import (
    INT_CONFIG,
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
)
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import VirtioDriver
from pystratovirt.virtio.net import (
    HDR_LEN,
    NET_HDR,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VirtioNet,
    generated_mac,
    parse_mac,
)
from pystratovirt.virtio.queue import read_buffers
from pystratovirt.virtio.tap import Tap
from virtio.helper import SpyMemory

MEM = 32 << 20
ETH_P_ALL = 0x0003
ETH_P_TEST = 0x88B5
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("02aabbccddee")
RX_BUF = HDR_LEN + 1526          # what a driver without offloads posts (§5.1.6.3.1)
BIG_RX_BUF = HDR_LEN + 65550     # with GUEST_TSO and no MRG_RXBUF
# What a driver without offloads accepts (ring features included, as Linux does).
PLAIN = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS)
         | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC))

pytestmark = pytest.mark.timeout(60)


def eth(payload: bytes, dst: bytes = GUEST_MAC, src: bytes = PEER_MAC, ethertype: int = ETH_P_TEST) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, num_buffers=0) -> bytes:
    return NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


# -- the two ends of the wire ----------------------------------------------------------------------
class Guest:
    """The guest's virtio-net driver, on top of the generic test driver."""

    def __init__(self, transport: VirtioMmio, mem, want: int | None = PLAIN):
        self.t = transport
        self.mem = mem
        self.drv = VirtioDriver(transport, mem, data_size=0x100_0000)
        self.features = self.drv.initialize(want=want)
        self.rx: dict[int, list[tuple[int, int]]] = {}

    def post_rx(self, count: int = 1, size: int = RX_BUF, pieces: list[int] | None = None,
                notify: bool = True) -> list[int]:
        heads = []
        for _ in range(count):
            bufs = [(self.drv.alloc(p), p) for p in (pieces or [size])]
            head = self.drv.submit(0, [], bufs)
            self.rx[head] = bufs
            heads.append(head)
        if notify:
            self.drv.notify(0)
        return heads

    def recv(self, count: int = 1, timeout: float = 5.0) -> list[tuple[tuple, bytes]]:
        out = []
        for head, n in self.drv.wait_used(0, count, timeout):
            data = read_buffers(self.mem, tuple(self.rx.pop(head)), n)
            assert len(data) == n
            out.append((NET_HDR.unpack(data[:HDR_LEN]), data[HDR_LEN:]))
        return out

    def send(self, frame: bytes, header: bytes | None = None, notify: bool = True) -> int:
        data = (header if header is not None else bytes(HDR_LEN)) + frame
        addr = self.drv.put(data)
        head = self.drv.submit(1, [(addr, len(data))], [])
        if notify:
            self.drv.notify(1)
        return head

    def wait_sent(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        return self.drv.wait_used(1, count, timeout)

    def config_status(self) -> int:
        return self.drv.read_config(netmod.CONFIG_STATUS, 2)


class Peer:
    """An AF_PACKET socket on the tap: the far end of the guest's cable."""

    def __init__(self, ns: NetNs, ifname: str, vnet_hdr: bool = False):
        with ns.entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            if vnet_hdr:
                self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            self.sock.bind((ifname, 0))
        self.vnet_hdr = vnet_hdr

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, timeout: float = 3.0, ethertype: int = ETH_P_TEST) -> bytes | None:
        """The next frame of ``ethertype`` the guest sent (vnet header first if enabled)."""
        off = 10 if self.vnet_hdr else 0
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            try:
                data, addr = self.sock.recvfrom(70000)
            except OSError as exc:
                if exc.errno == errno.ENETDOWN:   # reported once after the link went down
                    continue
                raise
            if addr[2] != PACKET_OUTGOING and data[off + 12:off + 14] == struct.pack("!H", ethertype):
                return data

    def close(self) -> None:
        self.sock.close()


class Nic:
    """Namespace + tap + device + transport + guest driver + peer, torn down in order."""

    def __init__(self, ns: NetNs, *, attach: bool = True, want: int | None = PLAIN, offloads: bool = True,
                 mac: str | None = "52:54:00:12:34:56"):
        self.ns = ns
        self.mem = SpyMemory(MEM)
        self.ifname = ns.add_tap("tap0")
        tap = ns.open_tap("tap0") if attach else None
        self.dev = VirtioNet(tap, mac=mac, vm_name="vm", slot=0, offloads=offloads)
        self.t = VirtioMmio(self.dev, self.mem, name="net0")
        self.t.start()
        self.guest = Guest(self.t, self.mem, want=want)
        self.peer = Peer(ns, "tap0")
        if attach:
            wait_carrier(ns)

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.t.close(timeout=5)
        assert not self.mem.violations
        self.mem.close()   # fails if the device still holds views of guest memory


@pytest.fixture
def nic(ns):
    n = Nic(ns)
    yield n
    n.close()


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def wait_carrier(ns: NetNs, ifname: str = "tap0") -> None:
    """Wait until the kernel has finished bringing the tap's carrier up after an attach: until
    its (asynchronous) link-watch work activates the qdisc, frames sent to it are dropped."""
    def up() -> bool:
        link = json.loads(ns.ip("-j", "link", "show", ifname).stdout)[0]
        return "LOWER_UP" in link["flags"] and link.get("qdisc") not in (None, "noop")
    assert wait_for(up), f"{ifname} has no carrier"


def tap_stats(ns: NetNs, ifname: str) -> dict:
    return json.loads(ns.ip("-j", "-s", "link", "show", ifname).stdout)[0]["stats64"]


# -- identity, features, config ----------------------------------------------------------------------
def test_identity_features_and_config(nic):
    t, dev = nic.t, nic.dev
    assert t.read(r.DEVICE_ID, 4) == 1
    for q in (0, 1):
        t.write(r.QUEUE_SEL, 4, q)
        assert t.read(r.QUEUE_NUM_MAX, 4) == 256
    t.write(r.QUEUE_SEL, 4, 2)
    assert t.read(r.QUEUE_NUM_MAX, 4) == 0   # no control queue
    offered = nic.guest.drv.device_features()
    for feature in (VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CSUM,
                    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4):
        assert offered & bit(feature)
    assert not offered & bit(15)   # no MRG_RXBUF
    assert not offered & bit(17)   # no control queue
    mac = bytes(nic.guest.drv.read_config(i, 1) for i in range(6))
    assert mac == GUEST_MAC
    assert nic.guest.config_status() == netmod.VIRTIO_NET_S_LINK_UP
    assert dev.link_up and dev.backend is not None
    no_offloads = VirtioNet(offloads=False)
    assert not no_offloads.device_features() & netmod.OFFLOAD_FEATURES
    no_offloads.close()


def test_generated_and_parsed_macs():
    a = generated_mac("vm1", 0)
    assert a == generated_mac("vm1", 0)                  # stable
    assert len({a, generated_mac("vm1", 1), generated_mac("vm2", 0)}) == 3
    for mac in (a, generated_mac("", 1)):
        assert mac[0] & 0x02 and not mac[0] & 0x01      # locally administered, unicast
    dev = VirtioNet(vm_name="vm1", slot=0)
    assert dev.mac == a and dev.read_config(0, 6) == int.from_bytes(a, "little")
    assert dev.read_config(netmod.CONFIG_STATUS, 2) == 0  # empty slot: link down
    dev.close()
    assert parse_mac("12:34:56:78:9A:bc") == bytes.fromhex("123456789abc")
    for bad in ("12:34:56:78:9a", "12-34-56-78-9a-bc", "zz:34:56:78:9a:bc", "01:00:5e:00:00:01",
                "00:00:00:00:00:00"):
        with pytest.raises(ValueError):
            parse_mac(bad)
    with pytest.raises(ValueError):
        VirtioNet(mac=b"\x02\x00")


# -- the data path ----------------------------------------------------------------------------------
def test_guest_tx_appears_on_the_tap(nic):
    frames = [eth(bytes([i]) * (46 + 100 * i), dst=PEER_MAC, src=GUEST_MAC) for i in range(5)]
    for f in frames:
        nic.guest.send(f)
    used = nic.guest.wait_sent(5)
    assert all(length == 0 for _, length in used)
    for f in frames:
        assert nic.peer.recv() == f          # bytes, MACs and length, in order
    s = nic.dev.stats
    assert s.tx_packets == 5 and s.tx_bytes == sum(map(len, frames)) and s.tx_dropped == s.tx_errors == 0


def test_guest_tx_split_header_and_indirect(nic):
    f = eth(b"split" * 40, dst=PEER_MAC, src=GUEST_MAC)
    data = bytes(HDR_LEN) + f
    pieces = [(nic.guest.drv.put(data[a:b]), b - a) for a, b in ((0, 5), (5, 12), (12, 40), (40, len(data)))]
    nic.guest.drv.submit(1, pieces, [], indirect=True)
    nic.guest.drv.notify(1)
    nic.guest.wait_sent(1)
    assert nic.peer.recv() == f


@pytest.mark.parametrize("ring", ["event_idx", "plain_ring"])
def test_tap_frame_reaches_guest_with_vnet_header(ns, ring):
    want = PLAIN if ring == "event_idx" else PLAIN & ~bit(VIRTIO_RING_F_EVENT_IDX)
    nic = Nic(ns, want=want)
    try:
        _rx_three_frames(nic)
    finally:
        nic.close()


def _rx_three_frames(nic: Nic) -> None:
    heads = nic.guest.post_rx(4)
    frames = [eth(bytes([0x40 + i]) * (60 + i * 300)) for i in range(3)]
    for f in frames:
        nic.peer.send(f)
    got = nic.guest.recv(3)
    for (header, data), f in zip(got, frames, strict=True):
        assert data == f
        assert header == (0, 0, 0, 0, 0, 0, 1)   # no offloads: flags 0, GSO none, num_buffers 1
    assert len(nic.guest.rx) == 1 and set(nic.guest.rx) < set(heads)
    s = nic.dev.stats
    assert s.rx_packets == 3 and s.rx_bytes == sum(map(len, frames))


def test_rx_into_scattered_buffers(nic):
    # The header itself split over two descriptors, then the frame over three.
    nic.guest.post_rx(pieces=[5, 7, 20, 100, 1500])
    f = eth(bytes(range(256)) * 3)
    nic.peer.send(f)
    ((header, data),) = nic.guest.recv(1)
    assert data == f and header[6] == 1


def test_back_pressure_frames_wait_in_the_tap(nic):
    # No receive buffers: the device must not read frames into nowhere.
    frames = [eth(struct.pack("!I", i) * 20) for i in range(20)]
    for f in frames:
        nic.peer.send(f)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.5)
    spent = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - sum(cpu[:2])
    assert spent < 0.1, f"{spent:.2f} s of CPU while idle: the tap poller is spinning"
    assert nic.guest.drv.take_used(0) == []
    assert nic.dev.stats.rx_packets == 0 and nic.dev.stats.rx_oversized == 0
    nic.guest.post_rx(8)
    got = nic.guest.recv(8)
    nic.guest.post_rx(12)
    got += nic.guest.recv(12)
    assert [data for _, data in got] == frames   # nothing lost, order kept
    assert tap_stats(nic.ns, "tap0")["tx"]["dropped"] == 0


def test_back_pressure_beyond_the_tap_queue_is_the_kernels_drop(nic):
    # The tap keeps txqueuelen frames; past that the kernel drops (and counts) them, not us.
    nic.ns.ip("link", "set", "tap0", "txqueuelen", "8")
    frames = [eth(struct.pack("!I", i) * 20) for i in range(20)]
    for f in frames:
        nic.peer.send(f)
    time.sleep(0.2)
    nic.guest.post_rx(32)
    got = nic.guest.recv(8)
    time.sleep(0.3)
    assert nic.guest.drv.take_used(0) == []
    assert [data for _, data in got] == frames[:8]
    assert tap_stats(nic.ns, "tap0")["tx"]["dropped"] == 12


def test_oversized_frame_is_dropped_and_counted(nic):
    small = 12 + 100
    guard = nic.guest.drv.alloc(small + 64)
    nic.mem.write(guard, b"\xee" * (small + 64))
    head = nic.guest.drv.submit(0, [], [(guard, small)])
    nic.guest.rx[head] = [(guard, small)]
    nic.guest.drv.notify(0)
    nic.peer.send(eth(b"B" * 200))           # 214 bytes: does not fit 100
    assert wait_for(lambda: nic.dev.stats.rx_oversized == 1)
    assert nic.guest.drv.take_used(0) == []
    assert nic.mem.read(guard + small, 64) == b"\xee" * 64   # nothing past the buffer
    fits = eth(b"s" * 60)
    nic.peer.send(fits)                      # the same chain takes the next frame that fits
    ((header, data),) = nic.guest.recv(1)
    assert data == fits
    assert nic.mem.read(guard + small, 64) == b"\xee" * 64


def test_exact_fit_and_one_byte_over(nic):
    size = HDR_LEN + 200
    nic.guest.post_rx(2, size=size)
    nic.peer.send(eth(b"x" * (200 - 14 + 1)))   # one byte too many
    nic.peer.send(eth(b"y" * (200 - 14)))       # exactly fills the chain
    ((_, data),) = nic.guest.recv(1)
    assert data == eth(b"y" * 186)
    assert nic.dev.stats.rx_oversized == 1


# -- hot-plug and link state --------------------------------------------------------------------------
def _config_irq(t: VirtioMmio, timeout: float = 2.0) -> bool:
    ready, _, _ = select.select([t.irq_eventfd], [], [], timeout)
    if not ready:
        return False
    os.eventfd_read(t.irq_eventfd)
    status = t.read(r.INTERRUPT_STATUS, 4)
    t.write(r.INTERRUPT_ACK, 4, status)
    return bool(status & INT_CONFIG)


def test_empty_slot_then_hot_plug_and_unplug(ns):
    nic = Nic(ns, attach=False)
    try:
        g, dev, t = nic.guest, nic.dev, nic.t
        assert g.config_status() == 0 and not dev.link_up
        # Empty slot: transmit completes (dropped), nothing is received.
        g.post_rx(2)
        g.send(eth(b"lost" * 20, dst=PEER_MAC, src=GUEST_MAC))
        g.wait_sent(1)
        assert dev.stats.tx_dropped == 1
        assert nic.peer.recv(timeout=0.3) is None
        _config_irq(t, 0)   # drain anything pending so far
        gen = t.read(r.CONFIG_GENERATION, 4)
        dev.set_backend(ns.open_tap("tap0")).result(5)                   # device_add
        wait_carrier(ns)
        assert _config_irq(t)                                  # the guest is told
        assert g.config_status() == netmod.VIRTIO_NET_S_LINK_UP
        assert t.read(r.CONFIG_GENERATION, 4) != gen
        f = eth(b"hello" * 20)
        nic.peer.send(f)                                       # buffers posted before the plug
        ((_, data),) = g.recv(1)
        assert data == f
        out = eth(b"out" * 30, dst=PEER_MAC, src=GUEST_MAC)
        g.send(out)
        g.wait_sent(1)
        assert nic.peer.recv() == out
        tap = dev.backend
        dev.set_backend(None).result(5)                                  # device_del
        assert _config_irq(t)
        assert g.config_status() == 0 and tap.closed
        g.send(out)
        g.wait_sent(1)
        assert dev.stats.tx_dropped == 2
        assert nic.peer.recv(timeout=0.3) is None
    finally:
        nic.close()


def test_hot_swap_to_another_tap(nic):
    ns = nic.ns
    ns.add_tap("tap1")
    peer1 = Peer(ns, "tap1")
    try:
        nic.guest.post_rx(4)
        old = nic.dev.backend
        _config_irq(nic.t, 0)
        nic.dev.set_backend(ns.open_tap("tap1")).result(5)
        wait_carrier(ns, "tap1")
        assert old.closed and nic.dev.link_up
        assert not _config_irq(nic.t, 0.2)   # still up: no link change to report
        f = eth(b"via tap1" * 10, dst=PEER_MAC, src=GUEST_MAC)
        nic.guest.send(f)
        nic.guest.wait_sent(1)
        assert peer1.recv() == f
        assert nic.peer.recv(timeout=0.3) is None
        back = eth(b"from tap1" * 10)
        peer1.send(back)
        ((_, data),) = nic.guest.recv(1)
        assert data == back
        ns.open_tap("tap0").close()   # the old tap was released
    finally:
        peer1.close()


def test_tap_deleted_under_a_running_device(nic, caplog):
    caplog.set_level(logging.WARNING, logger="pystratovirt.virtio.net")
    nic.guest.post_rx(4)
    f = eth(b"before" * 10)
    nic.peer.send(f)
    ((_, data),) = nic.guest.recv(1)
    assert data == f
    _config_irq(nic.t, 0)
    nic.peer.close()
    nic.ns.delete_link("tap0")
    assert _config_irq(nic.t)                        # link down reported to the guest
    assert wait_for(lambda: nic.dev.backend is None)
    assert nic.guest.config_status() == 0
    for _ in range(3):
        nic.guest.send(eth(b"into the void" * 5, dst=PEER_MAC, src=GUEST_MAC))
    nic.guest.wait_sent(3)                           # completed, not stuck
    assert nic.dev.stats.tx_dropped == 3
    gone = [rec for rec in caplog.records if "failed" in rec.getMessage()]
    assert len(gone) == 1 and "empty slot" in gone[0].getMessage()
    assert nic.t.read(r.STATUS, 4) & STATUS_DEVICE_NEEDS_RESET == 0
    # A new tap brings it back.
    nic.ns.add_tap("tap0")
    nic.dev.set_backend(nic.ns.open_tap("tap0")).result(5)
    nic.peer = Peer(nic.ns, "tap0")
    wait_carrier(nic.ns)
    again = eth(b"after" * 10)
    nic.peer.send(again)
    ((_, data),) = nic.guest.recv(1)
    assert data == again


def test_tap_deleted_while_the_guest_transmits(nic):
    nic.peer.close()
    nic.peer = None
    nic.ns.delete_link("tap0")
    nic.guest.send(eth(b"x" * 60, dst=PEER_MAC, src=GUEST_MAC))
    nic.guest.wait_sent(1)
    assert wait_for(lambda: nic.dev.backend is None)
    assert nic.dev.stats.tx_dropped == 1 and not nic.dev.link_up
    nic.peer = None


def test_tap_down_drops_tx_until_up(nic):
    out = eth(b"down" * 20, dst=PEER_MAC, src=GUEST_MAC)
    nic.ns.ip("link", "set", "tap0", "down")
    nic.guest.send(out)
    nic.guest.wait_sent(1)
    assert nic.dev.stats.tx_dropped == 1 and nic.dev.backend is not None and nic.dev.link_up
    nic.ns.ip("link", "set", "tap0", "up")
    wait_carrier(nic.ns)
    nic.guest.send(out)
    nic.guest.wait_sent(1)
    assert nic.peer.recv() == out


# -- transmit back-pressure (a tap that would block) --------------------------------------------------
def test_blocked_transmit_is_kept_and_retried(ns):
    # A SEQPACKET socket pair stands in for the tap: writes block once its buffer is full, which a
    # real tap only does with a small TUNSETSNDBUF. The device must keep the chains, not spin,
    # not block the notifying thread, and send them in order once the far end drains.
    mem = SpyMemory(MEM)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    fillers = 0
    while True:
        try:
            a.send(b"f" * 512)
            fillers += 1
        except BlockingIOError:
            break
    dev = VirtioNet(Tap(os.dup(a.fileno()), "fake0"), mac="52:54:00:12:34:56")
    a.close()
    t = VirtioMmio(dev, mem, name="net0")
    t.start()
    try:
        g = Guest(t, mem)
        frames = [eth(bytes([i]) * 100, dst=PEER_MAC, src=GUEST_MAC) for i in range(10)]
        start = time.monotonic()
        for f in frames:
            g.send(f)
        assert time.monotonic() - start < 0.5      # notifying never waits for the tap
        time.sleep(0.3)
        assert g.drv.take_used(1) == []            # kept, not dropped
        assert dev.stats.tx_packets == 0 and dev.stats.tx_dropped == 0
        b.setblocking(False)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < fillers + len(frames) and time.monotonic() < deadline:
            try:
                got.append(b.recv(4096))
            except BlockingIOError:
                time.sleep(0.01)
        assert got[fillers:] == [bytes(HDR_LEN) + f for f in frames]
        assert len(g.wait_sent(10)) == 10
        assert dev.stats.tx_packets == 10
    finally:
        t.close(timeout=5)
        b.close()
        assert not mem.violations
        mem.close()


# -- malformed chains ---------------------------------------------------------------------------------
def test_short_tx_chain_is_dropped_not_fatal(nic):
    addr = nic.guest.drv.put(b"tiny")
    nic.guest.drv.submit(1, [(addr, 4)], [])
    nic.guest.drv.notify(1)
    nic.guest.wait_sent(1)
    assert nic.dev.stats.tx_errors == 1
    assert not nic.t.read(r.STATUS, 4) & STATUS_DEVICE_NEEDS_RESET
    f = eth(b"fine" * 20, dst=PEER_MAC, src=GUEST_MAC)
    nic.guest.send(f)
    nic.guest.wait_sent(1)
    assert nic.peer.recv() == f


def test_rx_chain_without_room_for_the_header_needs_reset(nic):
    nic.guest.post_rx(pieces=[4])
    assert wait_for(lambda: nic.t.read(r.STATUS, 4) & STATUS_DEVICE_NEEDS_RESET)
    nic.peer.send(eth(b"z" * 50))
    time.sleep(0.2)
    assert nic.dev.stats.rx_packets == 0
    # A driver reset brings the device back.
    nic.guest = Guest(nic.t, nic.mem)
    nic.guest.post_rx(2)
    f = eth(b"again" * 20)
    nic.peer.send(f)
    # The frame sent while the device was failed waited in the tap; nothing was lost.
    assert [data for _, data in nic.guest.recv(2)] == [eth(b"z" * 50), f]


def test_reset_releases_cached_buffers(nic):
    nic.guest.post_rx(16)
    time.sleep(0.1)
    nic.guest = Guest(nic.t, nic.mem)   # reset + re-initialise
    nic.guest.post_rx(1)
    f = eth(b"fresh" * 20)
    nic.peer.send(f)
    ((_, data),) = nic.guest.recv(1)
    assert data == f


# -- offloads -----------------------------------------------------------------------------------------
SRC_IP, DST_IP = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_frame(payload: bytes, partial: bool, dst=GUEST_MAC, src=PEER_MAC) -> bytes:
    """Ethernet + IPv4 + TCP; ``partial``: the TCP checksum field holds only the pseudo-header
    sum, as a sender using checksum offload leaves it (NEEDS_CSUM)."""
    tcp_len = 20 + len(payload)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    pseudo = SRC_IP + DST_IP + struct.pack("!BBH", 0, 6, tcp_len)
    check = _csum(pseudo) if partial else 0xFFFF - _csum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0, SRC_IP, DST_IP)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _csum(ip)) + ip[12:]
    return eth(ip + tcp, dst=dst, src=src, ethertype=0x0800)


def tcp_checksum_ok(frame: bytes) -> bool:
    ip = frame[14:34]
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = frame[34:14 + total]
    pseudo = ip[12:16] + ip[16:20] + struct.pack("!BBH", 0, 6, len(tcp))
    return _csum(pseudo + tcp) == 0xFFFF


GSO_HDR = dict(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
               gso_size=1000, csum_start=34, csum_offset=16)


def test_tx_tso_frame_is_passed_to_the_tap_whole(ns):
    nic = Nic(ns, want=PLAIN | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4))
    vpeer = Peer(ns, "tap0", vnet_hdr=True)
    try:
        assert nic.guest.features & bit(VIRTIO_NET_F_HOST_TSO4)
        payload = bytes(range(250)) * 12   # 3000 bytes: three segments of 1000
        frame = tcp_frame(payload, partial=True, dst=PEER_MAC, src=GUEST_MAC)
        nic.guest.send(frame, header=hdr(**GSO_HDR))
        nic.guest.wait_sent(1)
        data = vpeer.recv(ethertype=0x0800)
        assert data is not None
        flags, gso_type, _hl, gso_size = struct.unpack("<BBHH", data[:6])
        assert gso_type == VIRTIO_NET_HDR_GSO_TCPV4 and gso_size == 1000
        assert data[10:] [:34] == frame[:34] and data[10 + 54:] == payload
    finally:
        vpeer.close()
        nic.close()


def _peer_sends_tso(ns: NetNs) -> None:
    vpeer = Peer(ns, "tap0", vnet_hdr=True)
    try:
        payload = bytes(range(200)) * 15   # 3000 bytes
        vpeer.send(hdr(**GSO_HDR)[:10] + tcp_frame(payload, partial=True))
    finally:
        vpeer.close()
    return payload


def test_rx_tso_reaches_a_guest_that_accepts_it_whole(ns):
    nic = Nic(ns, want=PLAIN | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4))
    try:
        nic.guest.post_rx(2, size=BIG_RX_BUF)
        payload = _peer_sends_tso(ns)
        ((header, data),) = nic.guest.recv(1)
        flags, gso_type, _hl, gso_size, csum_start, csum_offset, num_buffers = header
        assert gso_type == VIRTIO_NET_HDR_GSO_TCPV4 and gso_size == 1000
        assert flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and (csum_start, csum_offset) == (34, 16)
        assert num_buffers == 1 and data[54:] == payload
    finally:
        nic.close()


def test_rx_tso_is_segmented_and_checksummed_for_a_guest_without_offloads(ns):
    nic = Nic(ns, want=PLAIN)
    try:
        assert not nic.guest.features & bit(VIRTIO_NET_F_GUEST_CSUM)
        nic.guest.post_rx(8)
        payload = _peer_sends_tso(ns)
        got = nic.guest.recv(3)
        assert b"".join(data[54:] for _, data in got) == payload
        for header, data in got:
            assert header == (0, 0, 0, 0, 0, 0, 1)
            assert len(data) == 54 + 1000 and tcp_checksum_ok(data)
    finally:
        nic.close()


def test_rx_frames_with_unaccepted_offloads_are_dropped(ns):
    # Offloads switched on behind the device's back (as a stale queue or a foreign fd would):
    # a partial-checksum GSO frame must not reach a guest that did not accept it.
    nic = Nic(ns, want=PLAIN)
    try:
        nic.dev.backend.set_offload(netmod.TUN_F_CSUM | netmod.TUN_F_TSO4)
        nic.guest.post_rx(4, size=BIG_RX_BUF)
        _peer_sends_tso(ns)
        assert wait_for(lambda: nic.dev.stats.rx_dropped == 1)
        assert nic.guest.drv.take_used(0) == []
    finally:
        nic.close()
