"""Device state as values (no KVM): a split queue, the virtio-mmio transport and the blk, net and
balloon devices are saved from one instance and restored into a fresh one over the same guest
memory, and the driver carries on against the new one as if nothing happened. Chains a device
held (a NIC's receive buffers, transmit frames the tap refused, the balloon's statistics buffer)
are given back to the ring by the saved value and served by the restored device; so are the
rng's requests waiting for its budget and the console's kept receive buffers."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from pystratovirt.devices.chardev import SocketChardev
from pystratovirt.memory.guest import GuestMemory
from pystratovirt.memory.layout import MiB
from pystratovirt.virtio import mmio as r
from pystratovirt.virtio.balloon import STATS_QUEUE, BalloonState, VirtioBalloon
from pystratovirt.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkState, VirtioBlk
from pystratovirt.virtio.block_backend import DriveConfig, FileBackend
from pystratovirt.virtio.console import ConsoleState, VirtioConsole
from pystratovirt.virtio.device import Interrupt, VirtioState
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import BlkDriver, VirtioDriver
from pystratovirt.virtio.net import HDR_LEN, NetState, VirtioNet
from pystratovirt.virtio.queue import QueueError, QueueState, SplitQueue
from pystratovirt.virtio.rng import RngSource, RngState, VirtioRng
from pystratovirt.virtio.tap import Tap
from virtio.helper import WRITE, EchoDevice, Ring, spied_memory

pytestmark = pytest.mark.timeout(60)

MEM = 32 << 20
GUEST_MAC = bytes.fromhex("525400123456")


@pytest.fixture
def mem():
    yield from spied_memory(MEM)


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def save(t: VirtioMmio):
    """What the machine does while the VM is paused: hold the device still, take both values."""
    with t.device.lock:
        return t.save_state(), t.device.save_state()


def restored(t: VirtioMmio, device, mem, saved) -> VirtioMmio:
    """A new transport in front of ``device``, loaded with ``saved``, then started."""
    t.close(timeout=5)
    new = VirtioMmio(device, mem, name=t.name)
    new.restore_state(*saved)
    new.start()
    return new


# -- the split queue -------------------------------------------------------------------------------------
def test_queue_state_round_trip_and_rewind(mem):
    ring = Ring(mem, 8)
    for i in range(5):
        ring.set_desc(i, 0x8000 + 64 * i, 64, WRITE)
        ring.push(i)
    q = SplitQueue(mem, 8, ring.desc, ring.avail, ring.used, event_idx=True)
    chains = [q.pop() for _ in range(5)]
    q.add_used(chains[0].head, 10)
    q.add_used(chains[1].head, 10)
    assert q.needs_notification()
    state = q.save_state()
    assert state == QueueState(8, ring.desc, ring.avail, ring.used, True, False, 5, 2, 2)
    rewound = q.save_state(unfinished=3)
    assert rewound.last_avail_idx == 2 and q.last_avail_idx == 5  # the live queue is untouched
    with pytest.raises(ValueError, match="popped only 3"):
        q.save_state(unfinished=4)
    again = SplitQueue.from_state(mem, rewound)
    assert [again.pop().head for _ in range(3)] == [2, 3, 4]  # the held chains, in ring order
    assert again.pop() is None
    again.add_used(2, 1)
    assert ring.used_idx() == 3


@pytest.mark.parametrize("change, error", [
    (dict(size=6), QueueError), (dict(desc_addr=0x1001), QueueError), (dict(used_addr=MEM), QueueError),
    (dict(last_avail_idx=1 << 16), ValueError), (dict(used_idx=-1), ValueError),
    (dict(last_avail_idx=20, used_idx=2), ValueError), (dict(signalled_used=70000), ValueError),
])
def test_queue_from_state_validates_like_a_new_queue(mem, change, error):
    good = dict(size=8, desc_addr=0x1000, avail_addr=0x2000, used_addr=0x3000, event_idx=False,
                indirect=False, last_avail_idx=3, used_idx=3, signalled_used=None)
    SplitQueue.from_state(mem, QueueState(**good))
    with pytest.raises(error):
        SplitQueue.from_state(mem, QueueState(**(good | change)))


# -- transport + a simple device ------------------------------------------------------------------------
def echo(drv, qi=0, payload=b"hello"):
    src, dst = drv.put(payload), drv.alloc(len(payload))
    head = drv.submit(qi, [(src, len(payload))], [(dst, len(payload))])
    drv.notify(qi)
    assert drv.wait_used(qi) == [(head, len(payload))]
    return drv.mem.read(dst, len(payload))


def test_transport_and_device_continue_where_they_stopped(mem):
    dev = EchoDevice()
    t = VirtioMmio(dev, mem, name="echo0")
    t.start()
    drv = VirtioDriver(t, mem)
    features = drv.initialize(queue_size=8)
    for i in range(11):  # past the ring size, so the indices wrap the ring
        assert echo(drv, 0, b"abc%d" % i) == b"abc%d" % i
    dev.set_counter(7)
    drv.wr(r.QUEUE_SEL, 1)
    regs = {reg: drv.rd(reg) for reg in (r.STATUS, r.QUEUE_SEL, r.QUEUE_READY, r.QUEUE_NUM_MAX,
                                         r.INTERRUPT_STATUS, r.CONFIG_GENERATION)}
    saved = save(t)
    assert isinstance(saved[1], VirtioState) and saved[1].features == features

    dev2 = EchoDevice()
    t2 = restored(t, dev2, mem, saved)
    try:
        drv.t = t2
        assert {reg: drv.rd(reg) for reg in regs} == regs
        assert drv.read_config(4, 4) == 7
        assert dev2.activations == 1 and dev2.negotiated(0) is False
        for i in range(5):
            assert echo(drv, 0, b"xyz%d" % i) == b"xyz%d" % i
            assert echo(drv, 1, b"q1-%d" % i) == b"q1-%d" % i
        assert drv.used_idx(0) == 16
    finally:
        t2.close(timeout=5)


def test_transport_refuses_a_state_that_does_not_fit(mem):
    dev = EchoDevice()
    t = VirtioMmio(dev, mem, name="echo0")
    t.start()
    drv = VirtioDriver(t, mem)
    drv.initialize()
    transport, device = save(t)
    t.close(timeout=5)
    for bad_transport, bad_device, match in [
        (transport.__class__(**{**transport.__dict__, "queues": transport.queues[:1]}), device, "1 queues saved"),
        (transport.__class__(**{**transport.__dict__, "interrupt_status": 8}), device, "unknown bits"),
        (transport, device.__class__(**{**device.__dict__, "config": b"\0" * 4}), "config space of 4 bytes"),
        (transport, device.__class__(**{**device.__dict__, "features": device.features | 1 << 20}), "does not offer"),
        (transport.__class__(**{**transport.__dict__, "driver_features": device.features | 1}), device,
         "the driver accepted"),
    ]:
        fresh = VirtioMmio(EchoDevice(), mem, name="echo1")
        try:
            with pytest.raises(ValueError, match=match):
                fresh.restore_state(bad_transport, bad_device)
        finally:
            fresh.close(timeout=5)


# -- virtio-blk ------------------------------------------------------------------------------------------
def test_blk_continues_on_the_reopened_disk_and_checks_its_size(mem, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 * MiB))
    dev = VirtioBlk(FileBackend.open(DriveConfig("d", str(path), direct=False)), serial="SN1")
    t = VirtioMmio(dev, mem, name="blk0")
    t.start()
    drv = BlkDriver(t, mem)
    drv.initialize()
    data = bytes(range(256)) * 4
    assert drv.request(VIRTIO_BLK_T_OUT, 8, out=data)[0] == VIRTIO_BLK_S_OK
    saved = save(t)
    assert isinstance(saved[1], BlkState) and saved[1].serial == "SN1"

    # The machine reopens the drive and attaches it before the state goes in.
    dev2 = VirtioBlk(read_only=True)
    dev2.set_backend(FileBackend.open(DriveConfig("d", str(path), direct=False)), "SN1").result()
    t2 = restored(t, dev2, mem, saved)
    try:
        drv.t = t2
        assert not dev2.read_only and dev2.capacity == 2048
        status, got, _ = drv.request(VIRTIO_BLK_T_IN, 8, in_len=len(data))
        assert status == VIRTIO_BLK_S_OK and got == data
        assert drv.request(VIRTIO_BLK_T_OUT, 16, out=data)[0] == VIRTIO_BLK_S_OK
    finally:
        t2.close(timeout=5)

    other = tmp_path / "other.img"
    other.write_bytes(bytes(2 * MiB))
    dev3 = VirtioBlk()
    dev3.set_backend(FileBackend.open(DriveConfig("d", str(other), direct=False))).result()
    t3 = VirtioMmio(dev3, mem, name="blk0")
    try:
        with pytest.raises(ValueError, match="knows a disk of 2048 sectors, but the disk .* has 4096"):
            t3.restore_state(*saved)
    finally:
        t3.close(timeout=5)


def test_a_state_of_another_kind_is_refused(mem):
    t = VirtioMmio(EchoDevice(), mem, name="echo0")
    t.start()
    VirtioDriver(t, mem).initialize()
    saved = save(t)
    t.close(timeout=5)
    irq = Interrupt()
    for dev in (VirtioBlk(), VirtioNet(mac=GUEST_MAC), VirtioBalloon(MEM), VirtioRng(RngSource("/dev/urandom"))):
        with pytest.raises(ValueError, match="the saved state is a VirtioState"):
            dev.restore_state(saved[1], mem, irq)
        dev.close()
    rng = VirtioRng(RngSource("/dev/urandom"))
    with pytest.raises(ValueError, match="rng is an rng; the saved state is a BlkState"):
        rng.restore_state(BlkState(saved[1], None, False), mem, irq)
    rng.close()
    irq.close()


# -- virtio-rng and virtio-console ---------------------------------------------------------------------------
def test_rng_gives_requests_waiting_for_its_budget_back(mem):
    """64 bytes per minute: the first request takes the budget, the next two wait. They are given
    back to the ring and a restored device (its budget full: a new process, a new period) serves them."""
    dev = VirtioRng(RngSource("/dev/urandom"), max_bytes=64, period_ms=60_000)
    t = VirtioMmio(dev, mem, name="rng")
    t.start()
    drv = VirtioDriver(t, mem, data_size=0x100_0000)
    drv.initialize()
    bufs = {}
    for _ in range(3):
        addr = drv.alloc(64)
        bufs[drv.submit(0, [], [(addr, 64)])] = addr
    drv.notify(0)
    (first, n), = drv.wait_used(0, 1)
    assert n == 64
    assert wait_for(lambda: dev.waiting == 2)
    saved = save(t)
    assert isinstance(saved[1], RngState)
    q = saved[1].virtio.queues[0]
    assert (q.last_avail_idx, q.used_idx) == (1, 1)   # the two waiting requests given back
    assert dev.queue(0).last_avail_idx == 3           # ... in the value only

    dev2 = VirtioRng(RngSource("/dev/urandom"), max_bytes=64, period_ms=60_000)
    t2 = restored(t, dev2, mem, saved)
    try:
        drv.t = t2
        (second, n2), = drv.wait_used(0, 1)            # the new budget serves one of them
        assert second != first and n2 == 64
        assert wait_for(lambda: dev2.waiting == 1)
    finally:
        t2.close(timeout=5)


def test_console_gives_its_receive_buffers_back(mem, tmp_path):
    def console(path):
        dev = VirtioConsole(SocketChardev("con0", str(path)), name="console0")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        return dev, client

    dev, client = console(tmp_path / "a.sock")
    t = VirtioMmio(dev, mem, name="console0")
    t.start()
    client.connect(str(tmp_path / "a.sock"))
    drv = VirtioDriver(t, mem, data_size=0x100_0000)
    drv.initialize()
    bufs = {}
    for _ in range(4):
        addr = drv.alloc(256)
        bufs[drv.submit(0, [], [(addr, 256)])] = addr
    drv.notify(0)
    assert wait_for(lambda: dev.receive_buffers == 4)
    client.sendall(b"one")
    (head, n), = drv.wait_used(0, 1)
    assert mem.read(bufs[head], n) == b"one"
    saved = save(t)
    assert isinstance(saved[1], ConsoleState)
    rx, tx = saved[1].virtio.queues
    assert (rx.last_avail_idx, rx.used_idx) == (1, 1) and tx.last_avail_idx == 0
    client.close()

    # The restored device is on a chardev of its own (the new command line's socket).
    dev2, client2 = console(tmp_path / "b.sock")
    t2 = restored(t, dev2, mem, saved)
    try:
        drv.t = t2
        assert wait_for(lambda: dev2.receive_buffers == 3)
        client2.connect(str(tmp_path / "b.sock"))
        client2.sendall(b"two")
        (head, n), = drv.wait_used(0, 1)
        assert mem.read(bufs[head], n) == b"two"
    finally:
        t2.close(timeout=5)
        client2.close()


# -- virtio-net: a socket pair stands in for the tap ------------------------------------------------------
class FakeTap:
    """A SEQPACKET pair: the NIC's end wrapped as a Tap, ours to send frames in and read them out."""

    def __init__(self, fill: bool = False):
        a, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        self.fillers = 0
        if fill:  # a full send buffer: the NIC's writes block, as a busy tap's would
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            while True:
                try:
                    a.send(b"f" * 512)
                    self.fillers += 1
                except BlockingIOError:
                    break
        self.tap = Tap(os.dup(a.fileno()), "fake0")
        a.close()

    def send(self, frame: bytes) -> None:
        self.peer.send(bytes(HDR_LEN) + frame)

    def drain(self, count: int, timeout: float = 5.0) -> list[bytes]:
        self.peer.setblocking(False)
        got, deadline = [], time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                got.append(self.peer.recv(4096))
            except BlockingIOError:
                time.sleep(0.005)
        return got


def frame(i: int) -> bytes:
    return GUEST_MAC + bytes.fromhex("02aabbccddee") + struct.pack("!H", 0x88B5) + bytes([i]) * 60


def net_guest(t, mem):
    drv = VirtioDriver(t, mem, data_size=0x100_0000)
    drv.initialize(want=0)  # VERSION_1 only: the fake tap takes no offloads
    return drv


def test_net_gives_its_cached_receive_buffers_back(mem):
    fake = FakeTap()
    dev = VirtioNet(fake.tap, mac=GUEST_MAC)
    t = VirtioMmio(dev, mem, name="net0")
    t.start()
    drv = net_guest(t, mem)
    bufs = {}
    for _ in range(4):
        addr = drv.alloc(HDR_LEN + 1514)
        bufs[drv.submit(0, [], [(addr, HDR_LEN + 1514)])] = addr
    drv.notify(0)
    assert wait_for(lambda: len(dev._rx_chains) == 4)
    fake.send(frame(1))
    (head, n), = drv.wait_used(0, 1)
    assert mem.read(bufs[head] + HDR_LEN, n - HDR_LEN) == frame(1)
    saved = save(t)
    rx = saved[1].virtio.queues[0]
    assert isinstance(saved[1], NetState) and saved[1].mac == GUEST_MAC and saved[1].link_up
    assert (rx.last_avail_idx, rx.used_idx) == (1, 1)   # three held buffers given back
    assert dev.queue(0).last_avail_idx == 4             # ... in the value only
    fake.peer.close()

    fake2 = FakeTap()
    dev2 = VirtioNet(vm_name="other", slot=1)           # the MAC comes from the state
    dev2.set_backend(fake2.tap).result()
    t2 = restored(t, dev2, mem, saved)
    try:
        drv.t = t2
        assert dev2.mac == GUEST_MAC and drv.read_config(0, 4) == int.from_bytes(GUEST_MAC[:4], "little")
        assert wait_for(lambda: len(dev2._rx_chains) == 3)
        for i in (2, 3, 4):
            fake2.send(frame(i))
        used = drv.wait_used(0, 3)
        assert [mem.read(bufs[h] + HDR_LEN, n - HDR_LEN) for h, n in used] == [frame(2), frame(3), frame(4)]
    finally:
        t2.close(timeout=5)
        fake2.peer.close()


def test_net_gives_blocked_transmit_frames_back_and_sends_them_after_restore(mem):
    fake = FakeTap(fill=True)
    dev = VirtioNet(fake.tap, mac=GUEST_MAC)
    t = VirtioMmio(dev, mem, name="net0")
    t.start()
    drv = net_guest(t, mem)
    for i in range(3):
        data = bytes(HDR_LEN) + frame(i)
        drv.submit(1, [(drv.put(data), len(data))], [])
    drv.notify(1)
    assert wait_for(lambda: len(dev._tx_pending) == 3)
    saved = save(t)
    assert saved[1].virtio.queues[1].last_avail_idx == 0
    fake.peer.close()

    fake2 = FakeTap()
    dev2 = VirtioNet(mac=GUEST_MAC)
    dev2.set_backend(fake2.tap).result()
    t2 = restored(t, dev2, mem, saved)
    try:
        drv.t = t2
        assert fake2.drain(3) == [bytes(HDR_LEN) + frame(i) for i in range(3)]
        assert len(drv.wait_used(1, 3)) == 3
    finally:
        t2.close(timeout=5)
        fake2.peer.close()


# -- virtio-balloon ------------------------------------------------------------------------------------------
def test_balloon_keeps_its_pages_target_and_statistics_buffer():
    mem = GuestMemory(64 * MiB)
    dev = VirtioBalloon(mem.size, deflate_on_oom=True)
    t = VirtioMmio(dev, mem, name="balloon")
    t.start()
    try:
        drv = VirtioDriver(t, mem)
        drv.initialize()
        dev.set_target(48 * MiB)
        pfns = list(range(0x1000, 0x1000 + 512)) + list(range(0x2800, 0x2800 + 7))
        addr = drv.put(struct.pack(f"<{len(pfns)}I", *pfns))
        drv.submit(0, [(addr, 4 * len(pfns))], [])
        drv.notify(0)
        drv.wait_used(0, 1)
        t.write(r.CONFIG + 4, 4, len(pfns))   # the driver reports its balloon
        stats = drv.put(struct.pack("<HQ", 4, 123 << 20))
        drv.submit(STATS_QUEUE, [(stats, 10)], [])
        drv.notify(STATS_QUEUE)
        assert wait_for(lambda: dev.latest_stats() is not None)
        dev.set_stats_interval(30)
        saved = save(t)
    except BaseException:
        t.close(timeout=5)
        raise
    state = saved[1]
    assert isinstance(state, BalloonState) and state.stats_interval == 30
    assert state.virtio.queues[STATS_QUEUE].last_avail_idx == 0  # the held buffer goes back
    assert state.stats.values == {"free-memory": 123 << 20}

    dev2 = VirtioBalloon(mem.size, deflate_on_oom=True)
    t2 = restored(t, dev2, mem, saved)
    try:
        assert dev2.ballooned_pages() == len(pfns)
        assert dev2.target_bytes() == 48 * MiB and dev2.actual_bytes() == 64 * MiB - len(pfns) * 4096
        assert dev2.stats_interval == 30 and dev2.latest_stats().values == {"free-memory": 123 << 20}
        assert wait_for(lambda: dev2._stats_head is not None)  # taken again from the ring
        assert dev2.request_stats()
        drv.t = t2
        assert drv.wait_used(STATS_QUEUE, 1)
    finally:
        t2.close(timeout=5)
        mem.close()


def test_balloon_bitmap_pieces_are_checked():
    from pystratovirt.virtio.balloon import PageBitmap
    bitmap = PageBitmap(100)
    bitmap.set(3)
    bitmap.set(99)
    pieces = bitmap.chunks()
    copy = PageBitmap(100)
    copy.load_chunks(pieces)
    assert copy.count == 2 and copy.test(99) and copy.chunks() == pieces
    with pytest.raises(ValueError, match="outside"):
        PageBitmap(100).load_chunks([(10, b"\1" * 8)])
    with pytest.raises(ValueError, match="past the last"):
        PageBitmap(100).load_chunks([(12, b"\x10")])


def test_interrupt_restore_does_not_signal():
    irq = Interrupt()
    irq.restore(3)
    assert irq.status == 3
    with pytest.raises(BlockingIOError):
        os.eventfd_read(irq.eventfd)
    irq.close()
