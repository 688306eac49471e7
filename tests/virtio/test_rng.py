"""Tests of the virtio-rng device (pystratovirt.virtio.rng) behind the virtio-mmio transport, on its
own I/O thread, with the test-side driver playing the guest: real random sources (/dev/urandom,
a file, a FIFO), the rate limit measured on the clock, malformed chains, and the source checks."""

from __future__ import annotations

import os
import time

import pytest

from pystratovirt.virtio import mmio as r
from pystratovirt.virtio.device import VIRTIO_F_VERSION_1, bit
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import DriverError, VirtioDriver
from pystratovirt.virtio.rng import MAX_REQUEST, VIRTIO_ID_RNG, RngError, RngSource, VirtioRng
from virtio.helper import spied_memory

MEM = 32 << 20
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mem():
    yield from spied_memory(MEM)


@pytest.fixture
def rig(mem):
    """rig(source_path, **VirtioRng kwargs) -> (device, driver), the driver initialised."""
    made = []

    def make(path="/dev/urandom", **kw):
        dev = VirtioRng(RngSource(str(path)), **kw)
        t = VirtioMmio(dev, mem)
        t.start()
        made.append(t)
        drv = VirtioDriver(t, mem, data_size=0x100_0000)
        drv.initialize()
        return dev, drv
    yield make
    for t in made:
        t.close(timeout=5)


def request(drv, size: int, pieces: int = 1) -> tuple[int, int]:
    """Post one chain of ``pieces`` writable buffers totalling ``size`` bytes; returns (head, addr)."""
    addr = drv.alloc(size, 16)
    drv.mem.fill(addr, size)
    step = -(-size // pieces)
    bufs = [(addr + off, min(step, size - off)) for off in range(0, size, step)]
    return drv.submit(0, [], bufs), addr


def run(drv, size: int, pieces: int = 1) -> bytes:
    head, addr = request(drv, size, pieces)
    drv.notify(0)
    (uhead, n), = drv.wait_used(0, 1)
    assert uhead == head
    return drv.mem.read(addr, n)


def test_identity_and_features(rig):
    dev, drv = rig()
    assert drv.rd(r.DEVICE_ID) == VIRTIO_ID_RNG == 4
    assert drv.features & bit(VIRTIO_F_VERSION_1)
    drv.wr(r.QUEUE_SEL, 1)
    assert drv.rd(r.QUEUE_NUM_MAX) == 0   # one queue only


def test_random_bytes_arrive_and_are_counted(rig):
    dev, drv = rig()
    a = run(drv, 4096)
    b = run(drv, 4096, pieces=7)
    assert len(a) == len(b) == 4096
    assert a != b and len(set(a)) > 200 and len(set(b)) > 200   # not constant, not a pattern
    assert dev.stats.requests == 2 and dev.stats.bytes == 8192


def test_a_file_source_is_copied_exactly_across_buffers(rig, tmp_path):
    data = os.urandom(10000)
    src = tmp_path / "entropy"
    src.write_bytes(data)
    dev, drv = rig(src)
    got = run(drv, 3000, pieces=5) + run(drv, 3000, pieces=3)
    assert got == data[:6000]


def test_a_file_source_that_ends_stops_serving(rig, tmp_path, caplog):
    src = tmp_path / "short"
    src.write_bytes(b"x" * 100)
    dev, drv = rig(src)
    assert run(drv, 64) == b"x" * 64
    assert run(drv, 64) == b"x" * 36
    request(drv, 64)
    drv.notify(0)
    with pytest.raises(DriverError):
        drv.wait_used(0, 1, timeout=0.5)
    assert "reached its end" in caplog.text and dev.waiting == 1


def test_chain_without_writable_buffer_and_absurd_lengths(rig, mem):
    dev, drv = rig()
    out = drv.put(b"readable only")
    head = drv.submit(0, [(out, 13)], [])
    drv.notify(0)
    assert drv.wait_used(0, 1) == [(head, 0)]
    # 8 MiB of writable buffers: filled up to MAX_REQUEST, never beyond.
    big = drv.alloc(8 << 20, 4096)
    mem.fill(big, 8 << 20)
    head = drv.submit(0, [], [(big + i * (1 << 20), 1 << 20) for i in range(8)])
    drv.notify(0)
    assert drv.wait_used(0, 1) == [(head, MAX_REQUEST)]
    assert mem.read(big + MAX_REQUEST, 4096) == bytes(4096)
    assert dev.needs_reset is False and dev.stats.requests == 2


def test_rate_limit_spreads_bytes_over_periods(rig):
    """max_bytes per period: no chain gets more than the budget left, and the rest waits."""
    dev, drv = rig(max_bytes=1000, period_ms=300)
    started = time.monotonic()
    heads = [request(drv, 600)[0] for _ in range(5)]   # 3000 bytes wanted
    drv.notify(0)
    got, times = [], []
    while len(got) < 5:
        used = drv.wait_used(0, 1, timeout=5)
        now = time.monotonic() - started
        got += used
        times += [now] * len(used)
    assert [h for h, _ in got] == heads
    lengths = [n for _, n in got]
    assert lengths == [600, 400, 600, 400, 600]        # partial fills at the budget's edge
    # Three periods of 1000 bytes: the last bytes come two periods after the first.
    assert times[-1] >= 0.55
    assert dev.stats.bytes == 2600 and dev.stats.throttled >= 2
    # Bytes served within any one period never exceed the budget.
    assert sum(n for n, t in zip(lengths, times, strict=True) if t < 0.29) <= 1000


def test_without_limit_the_same_is_fast(rig):
    dev, drv = rig()
    started = time.monotonic()
    for _ in range(5):
        run(drv, 600)
    assert time.monotonic() - started < 0.5


def test_a_driver_reset_does_not_refill_the_budget(rig):
    dev, drv = rig(max_bytes=256, period_ms=1000)
    assert len(run(drv, 256)) == 256
    drv.initialize()   # reset and start again: the period is still running
    head, _ = request(drv, 256)
    drv.notify(0)
    with pytest.raises(DriverError):
        drv.wait_used(0, 1, timeout=0.3)
    assert drv.wait_used(0, 1, timeout=3) == [(head, 256)]


def test_a_source_that_would_block_is_waited_for(rig, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dev, drv = rig(fifo)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        head, addr = request(drv, 32)
        drv.notify(0)
        with pytest.raises(DriverError):
            drv.wait_used(0, 1, timeout=0.3)   # nothing to read yet: the chain waits
        os.write(writer, b"entropy!")
        assert drv.wait_used(0, 1, timeout=5) == [(head, 8)]
        assert drv.mem.read(addr, 8) == b"entropy!"
    finally:
        os.close(writer)


@pytest.mark.parametrize("make, message", [
    (lambda tmp: str(tmp / "missing"), "does not exist"),
    (lambda tmp: str(tmp), "is not a character device, FIFO or regular file"),
    (lambda tmp: "", "does not exist"),
    (lambda tmp: "bad\0path", "cannot be opened"),
])
def test_unusable_sources_are_one_sentence(tmp_path, make, message):
    with pytest.raises(RngError) as err:
        RngSource(make(tmp_path))
    assert message in err.value.desc and err.value.desc.endswith(".")


@pytest.mark.parametrize("kw", [{"max_bytes": 0}, {"max_bytes": -5}, {"period_ms": 0}, {"max_bytes": True}])
def test_limits_that_are_not_limits(kw):
    source = RngSource("/dev/urandom")
    try:
        with pytest.raises(RngError):
            VirtioRng(source, **kw)
    finally:
        source.close()


class FlakySource(RngSource):
    """/dev/urandom whose reads fail with EIO while ``broken`` (a failing /dev/hwrng)."""

    def __init__(self):
        super().__init__("/dev/urandom")
        self.broken = True
        self.attempts = 0

    def readv(self, views):
        self.attempts += 1
        if self.broken:
            raise OSError(5, "Input/output error")
        return super().readv(views)


def test_a_failing_source_is_retried_each_second_not_in_a_loop(mem, caplog):
    source = FlakySource()
    dev = VirtioRng(source)
    t = VirtioMmio(dev, mem)
    t.start()
    try:
        drv = VirtioDriver(t, mem, data_size=0x100_0000)
        drv.initialize()
        head, _ = request(drv, 32)
        drv.notify(0)
        with pytest.raises(DriverError):
            drv.wait_used(0, 1, timeout=1.5)
        assert 1 <= source.attempts <= 3, source.attempts
        assert "retried every second" in caplog.text
        source.broken = False
        assert drv.wait_used(0, 1, timeout=3) == [(head, 32)]
    finally:
        t.close(timeout=5)
