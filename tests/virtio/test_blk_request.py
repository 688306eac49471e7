"""virtio-blk requests on their own (pystratovirt.virtio.blk.BlkRequest): parsed from a chain and
carried out against a real disk image in guest memory, with no queue and no device; a fuzzer that
only ever sees a request or a QueueError; and BLOCK_IO_ERROR's rate limit through the device."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pystratovirt.memory.guest import GuestMemory
from pystratovirt.virtio import blk
from pystratovirt.virtio.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, BlkRequest, VirtioBlk
from pystratovirt.virtio.block_backend import DriveConfig, FileBackend
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import BlkDriver
from pystratovirt.virtio.queue import DescChain, QueueError
from virtio.helper import SpyMemory

MEM = 4 << 20
HDR = struct.Struct("<IIQ")


@pytest.fixture
def mem():
    m = SpyMemory(MEM)
    yield m
    assert not m.violations
    m.close()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(bytes(range(256)) * 16 * 64)  # 256 KiB
    backend = FileBackend.open(DriveConfig("d", str(path), direct=False))
    yield backend
    backend.close()


def chain(mem: GuestMemory, rtype: int, sector: int, *, data: bytes = b"", in_len: int = 0) -> DescChain:
    mem.write(0x1000, HDR.pack(rtype, 0, sector))
    readable = [(0x1000, HDR.size)] + ([(0x2000, len(data))] if data else [])
    if data:
        mem.write(0x2000, data)
    writable = ([(0x10000, in_len)] if in_len else []) + [(0x30000, 1)]
    return DescChain(0, tuple(readable), tuple(writable))


def run(mem, backend, c, **kw):
    opts = dict(writes_refused=False, serial=None, discard=True, write_zeroes=True)
    opts.update(kw)
    return BlkRequest.parse(c, mem).execute(mem, backend, **opts)


def test_parse_frames_header_data_and_status(mem):
    req = BlkRequest.parse(chain(mem, blk.VIRTIO_BLK_T_IN, 7, in_len=1024), mem)
    assert (req.type, req.sector, req.data_out, req.data_in, req.status) == (
        blk.VIRTIO_BLK_T_IN, 7, (), ((0x10000, 1024),), 0x30000)
    # a header split over two descriptors, the status byte at the end of a data buffer
    mem.write(0x1000, HDR.pack(blk.VIRTIO_BLK_T_OUT, 0, 3))
    split = DescChain(5, ((0x1000, 10), (0x1000 + 10, 6 + 512)), ((0x20000, 1),))
    req = BlkRequest.parse(split, mem)
    assert (req.type, req.sector, req.data_out, req.status) == (blk.VIRTIO_BLK_T_OUT, 3, ((0x1010, 512),), 0x20000)


@pytest.mark.parametrize("c, text", [
    (DescChain(1, ((0x1000, 15),), ((0x2000, 1),)), "has a 15-byte header"),
    (DescChain(2, ((0x1000, 16),), ()), "has no status byte"),
])
def test_parse_refuses_what_cannot_be_framed(mem, c, text):
    with pytest.raises(QueueError, match=text):
        BlkRequest.parse(c, mem)


def test_read_write_round_trip_against_a_real_image(mem, disk):
    assert run(mem, disk, chain(mem, blk.VIRTIO_BLK_T_IN, 2, in_len=512)) == (VIRTIO_BLK_S_OK, 512)
    assert mem.read(0x10000, 512) == (bytes(range(256)) * 2)
    assert run(mem, disk, chain(mem, blk.VIRTIO_BLK_T_OUT, 4, data=b"\xab" * 1024)) == (VIRTIO_BLK_S_OK, 0)
    assert run(mem, disk, chain(mem, blk.VIRTIO_BLK_T_IN, 4, in_len=1024)) == (VIRTIO_BLK_S_OK, 1024)
    assert mem.read(0x10000, 1024) == b"\xab" * 1024


@pytest.mark.parametrize("rtype, sector, kw, status", [
    (blk.VIRTIO_BLK_T_IN, 511, {"in_len": 1024}, VIRTIO_BLK_S_IOERR),        # runs off the end
    (blk.VIRTIO_BLK_T_IN, 0, {"in_len": 100}, VIRTIO_BLK_S_IOERR),           # not whole sectors
    (blk.VIRTIO_BLK_T_IN, 1 << 60, {"in_len": 512}, VIRTIO_BLK_S_IOERR),     # far past the end
    (99, 0, {}, VIRTIO_BLK_S_UNSUPP),
    (blk.VIRTIO_BLK_T_FLUSH, 0, {}, VIRTIO_BLK_S_OK),
])
def test_content_is_judged_with_a_status(mem, disk, rtype, sector, kw, status):
    assert run(mem, disk, chain(mem, rtype, sector, **kw))[0] == status


def test_read_only_serial_empty_slot_and_features(mem, disk):
    out = chain(mem, blk.VIRTIO_BLK_T_OUT, 0, data=bytes(512))
    assert run(mem, disk, out, writes_refused=True)[0] == VIRTIO_BLK_S_IOERR
    assert run(mem, disk, chain(mem, blk.VIRTIO_BLK_T_GET_ID, 0, in_len=20), serial="SN-1") == (VIRTIO_BLK_S_OK, 20)
    assert mem.read(0x10000, 20) == b"SN-1".ljust(20, b"\0")
    assert run(mem, None, chain(mem, blk.VIRTIO_BLK_T_IN, 0, in_len=512))[0] == VIRTIO_BLK_S_IOERR
    seg = struct.pack("<QII", 0, 8, 0)
    assert run(mem, disk, chain(mem, blk.VIRTIO_BLK_T_DISCARD, 0, data=seg), discard=False)[0] == VIRTIO_BLK_S_UNSUPP
    assert run(mem, disk, chain(mem, blk.VIRTIO_BLK_T_DISCARD, 0, data=seg))[0] == VIRTIO_BLK_S_OK


buffers = st.lists(st.tuples(st.integers(0, MEM + 0x1000), st.integers(0, 0x3000)), max_size=4)


@settings(max_examples=300, deadline=None)
@given(readable=buffers, writable=buffers, header=st.binary(min_size=16, max_size=16),
       serial=st.none() | st.text(max_size=30), flags=st.booleans())
def test_fuzz_parse_and_execute(tmp_path_factory, readable, writable, header, serial, flags):
    """Any chain the queue could hand over (buffers inside RAM): parse gives a request or a
    QueueError; execute gives a status and never reaches outside RAM."""
    mem = SpyMemory(MEM)
    path = tmp_path_factory.mktemp("fz") / "d.img"
    path.write_bytes(bytes(64 * 1024))
    backend = FileBackend.open(DriveConfig("d", str(path), direct=False))
    try:
        def inside(bufs):  # what the queue allows
            return tuple((a, n) for a, n in bufs if mem.contains(a, n))

        readable, writable = inside(readable), inside(writable)
        if readable and readable[0][1] >= 16:
            mem.write(readable[0][0], header)
        try:
            req = BlkRequest.parse(DescChain(0, readable, writable), mem)
        except QueueError:
            return
        status, written = req.execute(mem, backend, writes_refused=flags, serial=serial, discard=flags,
                                      write_zeroes=not flags)
        assert status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP)
        assert 0 <= written <= sum(n for _, n in req.data_in)
        assert not mem.violations
    finally:
        backend.close()
        mem.close()


def test_block_io_errors_are_reported_and_rate_limited(monkeypatch):
    """BLOCK_IO_ERROR: the first error at once, then one per interval while errors go on."""
    monkeypatch.setattr(blk, "IO_ERROR_REPORT_INTERVAL", 0.3)
    mem = GuestMemory(32 << 20)
    reports = []
    got = threading.Event()

    def on_error(operation, nospace, reason):
        reports.append((time.monotonic(), operation, nospace, reason))
        got.set()
    fd = os.open("/dev/full", os.O_RDWR)  # every write fails with ENOSPC
    dev = VirtioBlk(FileBackend(fd, path="/dev/full", size=1 << 20), on_io_error=on_error)
    t = VirtioMmio(dev, mem)
    t.start()
    try:
        drv = BlkDriver(t, mem)
        drv.initialize()
        for _ in range(20):
            assert drv.request(blk.VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
        assert got.wait(5)
        time.sleep(0.6)  # the held-back error is reported when the window ends
        assert [r[1:] for r in reports] == [("write", True, "No space left on device")] * 2
        assert reports[1][0] - reports[0][0] >= 0.25
    finally:
        t.close(5)
        mem.close()
