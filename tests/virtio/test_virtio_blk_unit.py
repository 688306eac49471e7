"""Unit tests of the virtio-blk device model end to end without KVM: the test plays the guest
driver (descriptors in guest memory, QueueNotify, interrupt eventfd) against a real transport
and I/O thread, and checks the host file, the used ring and the status byte."""

import errno
import fcntl
import os
import shutil
import stat
import struct
import tempfile
import threading
import time

import pytest

from pystratovirt.virtio import blk as blkmod
from pystratovirt.virtio import block_backend as backendmod
from pystratovirt.virtio import mmio as r
from pystratovirt.virtio.blk import (
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    SEG_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlk,
)
from pystratovirt.virtio.block_backend import BackendError, DriveConfig, FileBackend
from pystratovirt.virtio.device import (
    INT_CONFIG,
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
)
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import BLK_HEADER, BlkDriver
from virtio.helper import spied_memory

MEM = 32 << 20
MiB = 1 << 20
SEG = struct.Struct("<QII")


def open_image(path, *, read_only=False, direct=False):
    """FileBackend.open of a DriveConfig, with the buffered default these tests want."""
    return FileBackend.open(DriveConfig("d", str(path), read_only=read_only, direct=direct))


def pattern(n, seed=0):
    """Deterministic test data, different in every sector of a 64 KiB period."""
    period = bytes((i * 7 + seed + (i >> 9)) & 0xFF for i in range(min(n, 64 * 1024)))
    return (period * (n // len(period) + 1))[:n] if n else b""


@pytest.fixture
def mem():
    yield from spied_memory(MEM)


@pytest.fixture
def image(tmp_path):
    def make(size=MiB, name="disk.img", content=None):
        path = tmp_path / name
        path.write_bytes(content if content is not None else pattern(size))
        return str(path)
    return make


@pytest.fixture
def direct_dir():
    """O_DIRECT needs a filesystem that supports it; tmpfs on older kernels does not."""
    path = tempfile.mkdtemp(prefix="pystratovirt-odirect-", dir="/var/tmp")
    probe = os.path.join(path, "probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT)
        os.close(fd)
    except OSError as exc:
        shutil.rmtree(path)
        pytest.skip(f"/var/tmp does not support O_DIRECT here ({exc.strerror})")
    yield path
    shutil.rmtree(path)


@pytest.fixture
def rig(mem):
    """rig(backend, **VirtioBlk kwargs, want=features) -> (device, transport, driver), initialised."""
    made = []

    def make(backend, *, want=None, init=True, **kw):
        dev = VirtioBlk(backend, name=f"vd{len(made)}", **kw)
        t = VirtioMmio(dev, mem)
        t.start()
        made.append(t)
        drv = BlkDriver(t, mem, ring_base=0x10_0000, data_base=0x20_0000, data_size=MEM - 0x20_0000)
        if init:
            drv.initialize(want=want)
        return dev, t, drv

    yield make
    for t in made:
        t.close(timeout=10)


def file_bytes(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def segs(*items):
    return b"".join(SEG.pack(*i) for i in items)


# -- config and features ---------------------------------------------------------------------------
def test_config_space(rig, image):
    dev, t, drv = rig(open_image(image(3 * MiB + 700)))
    assert drv.read_config(0, 8) == (3 * MiB + 700) // 512
    assert drv.read_config(12, 4) == SEG_MAX == 254
    assert drv.read_config(20, 4) == 512                      # blk_size
    assert drv.read_config(36, 4) == MAX_DISCARD_SECTORS
    assert drv.read_config(40, 4) == MAX_DISCARD_SEG
    assert drv.read_config(44, 4) == 8                        # discard_sector_alignment
    assert drv.read_config(48, 4) == blkmod.MAX_WRITE_ZEROES_SECTORS
    assert drv.read_config(52, 4) == blkmod.MAX_WRITE_ZEROES_SEG
    assert drv.read_config(56, 1) == 1                        # write_zeroes_may_unmap
    assert drv.read_config(57, 3) == 0                        # unused1
    # 64-bit field read as two 32-bit halves, the way Linux does it
    lo, hi = t.read(r.CONFIG, 4), t.read(r.CONFIG + 4, 4)
    assert lo | hi << 32 == dev.capacity


def test_features_offered(rig, image):
    dev, _, drv = rig(open_image(image()), init=False)
    f = drv.device_features()
    for b in (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_BLK_F_SEG_MAX,
              VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert f & bit(b), b
    assert not f & bit(VIRTIO_BLK_F_RO)
    ro_dev, _, ro_drv = rig(open_image(image(name="ro.img"), read_only=True), init=False)
    assert ro_drv.device_features() & bit(VIRTIO_BLK_F_RO)
    assert r.VirtioMmio  # transport module in use
    assert dev.device_id == 2 and dev.queue_max_sizes == (256,)


# -- reads and writes ------------------------------------------------------------------------------
def test_write_then_read(rig, image):
    path = image()
    _, _, drv = rig(open_image(path))
    data = pattern(4096, seed=99)
    status, _, used = drv.request(VIRTIO_BLK_T_OUT, 8, out=data)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert file_bytes(path, 8 * 512, 4096) == data
    assert file_bytes(path, 0, 4096) == pattern(MiB)[:4096]  # neighbours untouched
    status, got, used = drv.request(VIRTIO_BLK_T_IN, 8, in_len=4096)
    assert (status, got, used) == (VIRTIO_BLK_S_OK, data, 4097)
    status, got, _ = drv.request(VIRTIO_BLK_T_IN, 0, in_len=1024)
    assert got == pattern(MiB)[:1024]


@pytest.mark.parametrize("split,indirect", [(100, False), (512, True), (1, True), (4095, False)])
def test_scatter_gather(rig, image, split, indirect):
    path = image()
    _, _, drv = rig(open_image(path))
    data = pattern(8192, seed=split)
    status, _, _ = drv.request(VIRTIO_BLK_T_OUT, 100, out=data, split=split, indirect=indirect)
    assert status == VIRTIO_BLK_S_OK
    assert file_bytes(path, 100 * 512, 8192) == data
    status, got, _ = drv.request(VIRTIO_BLK_T_IN, 100, in_len=8192, split=split, indirect=indirect)
    assert got == data


def test_any_layout_header_split_and_status_shares_a_buffer(rig, image, mem):
    path = image()
    _, _, drv = rig(open_image(path))
    hdr = drv.put(BLK_HEADER.pack(VIRTIO_BLK_T_IN, 0, 3))
    buf = drv.alloc(513)
    mem.write_u8(buf + 512, 0xFF)
    head = drv.submit(0, [(hdr, 5), (hdr + 5, 11)], [(buf, 513)])  # header in two pieces
    drv.notify(0)
    assert drv.wait_used(0) == [(head, 513)]
    assert mem.read(buf, 512) == file_bytes(path, 3 * 512, 512)
    assert mem.read_u8(buf + 512) == VIRTIO_BLK_S_OK


def test_without_event_idx_and_indirect(rig, image):
    path = image()
    dev, _, drv = rig(open_image(path), want=bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BLK_F_FLUSH))
    assert not dev.negotiated(VIRTIO_RING_F_EVENT_IDX)
    for i in range(20):
        assert drv.request(VIRTIO_BLK_T_OUT, i, out=pattern(512, i))[0] == VIRTIO_BLK_S_OK
    assert file_bytes(path, 0, 20 * 512) == b"".join(pattern(512, i) for i in range(20))


def test_many_requests_in_one_notification(rig, image):
    path = image(4 * MiB)
    _, _, drv = rig(open_image(path))
    posted = []
    for i in range(200):  # more than one BATCH, fewer than the 256 ring entries
        posted.append(drv.post(VIRTIO_BLK_T_OUT, 8 * i, out=pattern(4096, i), publish=False,
                                  indirect=True))
    drv.publish(0)
    drv.notify(0)
    used = drv.wait_used(0, 200, timeout=30)
    assert sorted(h for h, _ in used) == sorted(h for h, _, _ in posted)
    assert all(drv.mem.read_u8(s) == VIRTIO_BLK_S_OK for _, s, _ in posted)
    for i in (0, 57, 199):
        assert file_bytes(path, 8 * i * 512, 4096) == pattern(4096, i)


# -- bounds ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sector,length,ok", [
    (2047, 512, True), (2048, 512, False), (2046, 1024, True), (2047, 1024, False),
    (2048, 0, True), (2049, 0, False), (2**64 - 1, 512, False), (2**63, 512, False),
    (0, 100, False), (0, 513, False),
])
def test_sector_bounds(rig, image, sector, length, ok):
    path = image(MiB)  # 2048 sectors
    _, t, drv = rig(open_image(path))
    before = file_bytes(path, 0, MiB)
    expected = VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, sector, in_len=length)[0] == expected
    assert drv.request(VIRTIO_BLK_T_OUT, sector, out=bytes(length))[0] == expected
    if not ok:
        assert file_bytes(path, 0, MiB) == before
        assert os.path.getsize(path) == MiB  # never extended
    assert not rd_status(t) & STATUS_DEVICE_NEEDS_RESET


def rd_status(t):
    return t.read(r.STATUS, 4)


def test_partial_trailing_sector_is_not_addressable(rig, image):
    path = image(1000)
    dev, _, drv = rig(open_image(path))
    assert dev.capacity == 1
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_IN, 1, in_len=512)[0] == VIRTIO_BLK_S_IOERR


# -- flush, get-id, unsupported --------------------------------------------------------------------
def test_flush_calls_fdatasync(rig, image, monkeypatch):
    be = open_image(image())
    _, _, drv = rig(be)
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    status, _, used = drv.request(VIRTIO_BLK_T_FLUSH)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert calls == [be.fd]


def test_flush_error_is_ioerr(rig, monkeypatch):
    fd = os.open("/dev/full", os.O_RDWR)
    _, _, drv = rig(FileBackend(fd, path="/dev/full", size=MiB))
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_IOERR  # fdatasync: EINVAL


@pytest.mark.parametrize("serial,expected", [
    ("SERIAL-0123456789-AB", b"SERIAL-0123456789-AB"),        # exactly 20: no NUL
    ("abc", b"abc" + bytes(17)),
    ("a-serial-longer-than-twenty", b"a-serial-longer-than"),
    (None, bytes(20)),
])
def test_get_id(rig, image, serial, expected):
    _, _, drv = rig(open_image(image()), serial=serial)
    status, got, used = drv.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert (status, got, used) == (VIRTIO_BLK_S_OK, expected, 21)


def test_get_id_into_a_short_buffer(rig, image):
    _, _, drv = rig(open_image(image()), serial="0123456789abcdef")
    status, got, used = drv.request(VIRTIO_BLK_T_GET_ID, in_len=8)
    assert (status, got, used) == (VIRTIO_BLK_S_OK, b"01234567", 9)


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 15, 16, 0x8000_0000, 0xFFFF_FFFF])
def test_unsupported_types(rig, image, rtype):
    _, t, drv = rig(open_image(image()))
    status, _, used = drv.request(rtype, 0, in_len=512)
    assert (status, used) == (VIRTIO_BLK_S_UNSUPP, 1)
    assert not rd_status(t) & STATUS_DEVICE_NEEDS_RESET


# -- discard and write-zeroes ----------------------------------------------------------------------
def test_discard_punches_a_hole(rig, image):
    path = image(4 * MiB)
    _, _, drv = rig(open_image(path))
    blocks_before = os.stat(path).st_blocks
    status, _, used = drv.request(VIRTIO_BLK_T_DISCARD, out=segs((2048, 2048, 0), (6144, 8, 0)))
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert os.stat(path).st_blocks < blocks_before
    assert os.path.getsize(path) == 4 * MiB
    assert file_bytes(path, MiB, MiB) == bytes(MiB)      # this host punches real holes
    assert file_bytes(path, 0, MiB) == pattern(4 * MiB)[:MiB]


@pytest.mark.parametrize("payload,expected", [
    (segs((0, 8, 1)), VIRTIO_BLK_S_UNSUPP),               # UNMAP on a discard
    (segs((0, 8, 2)), VIRTIO_BLK_S_UNSUPP),               # unknown flag
    (segs((0, 8, 0), (8, 8, 0x8000_0000)), VIRTIO_BLK_S_UNSUPP),
    (segs((2040, 16, 0)), VIRTIO_BLK_S_IOERR),            # past capacity
    (segs((2**64 - 8, 16, 0)), VIRTIO_BLK_S_IOERR),
    (segs((0, MAX_DISCARD_SECTORS + 1, 0)), VIRTIO_BLK_S_IOERR),
    (segs(*[(i, 1, 0) for i in range(MAX_DISCARD_SEG + 1)]), VIRTIO_BLK_S_IOERR),
    (segs((0, 8, 0))[:15], VIRTIO_BLK_S_IOERR),           # not whole segments
    (b"", VIRTIO_BLK_S_IOERR),
])
def test_discard_rejections(rig, image, payload, expected):
    path = image(MiB)
    _, _, drv = rig(open_image(path))
    out = payload if payload else None
    assert drv.request(VIRTIO_BLK_T_DISCARD, out=out)[0] == expected
    assert file_bytes(path, 0, MiB) == pattern(MiB)


def test_discard_and_write_zeroes_unsupp_when_not_negotiated(rig, image):
    _, _, drv = rig(open_image(image()), want=bit(VIRTIO_F_VERSION_1))
    assert drv.request(VIRTIO_BLK_T_DISCARD, out=segs((0, 8, 0)))[0] == VIRTIO_BLK_S_UNSUPP
    assert drv.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segs((0, 8, 0)))[0] == VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes(rig, image, unmap):
    path = image(2 * MiB)
    _, _, drv = rig(open_image(path))
    status, _, _ = drv.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segs((1, 7, unmap), (100, 300, unmap)))
    assert status == VIRTIO_BLK_S_OK
    data = file_bytes(path, 0, 2 * MiB)
    ref = bytearray(pattern(2 * MiB))
    ref[512:8 * 512] = bytes(7 * 512)
    ref[100 * 512:400 * 512] = bytes(300 * 512)
    assert data == bytes(ref)


def test_write_zeroes_falls_back_to_writing_zeroes(rig, image, monkeypatch):
    path = image(MiB)
    _, _, drv = rig(open_image(path))
    modes = []

    def no_fallocate(fd, mode, offset, length):
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not here")
    monkeypatch.setattr(backendmod, "fallocate", no_fallocate)
    assert drv.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segs((3, 5, 1)))[0] == VIRTIO_BLK_S_OK
    assert modes == [backendmod.FALLOC_FL_PUNCH_HOLE | backendmod.FALLOC_FL_KEEP_SIZE,
                     backendmod.FALLOC_FL_ZERO_RANGE | backendmod.FALLOC_FL_KEEP_SIZE]
    assert file_bytes(path, 3 * 512, 5 * 512) == bytes(5 * 512)
    assert file_bytes(path, 8 * 512, 512) == pattern(MiB)[8 * 512:9 * 512]
    # Discard without hole punching is a successful no-op (discard is advisory).
    assert drv.request(VIRTIO_BLK_T_DISCARD, out=segs((16, 8, 0)))[0] == VIRTIO_BLK_S_OK
    assert file_bytes(path, 16 * 512, 8 * 512) == pattern(MiB)[16 * 512:24 * 512]


# -- read-only ---------------------------------------------------------------------------------------
def test_read_only_drive(rig, image):
    path = image()
    dev, t, drv = rig(open_image(path, read_only=True))
    assert dev.negotiated(VIRTIO_BLK_F_RO)
    assert drv.request(VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_DISCARD, out=segs((0, 8, 0)))[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segs((0, 8, 0)))[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512)[1] == pattern(MiB)[:512]
    assert file_bytes(path, 0, MiB) == pattern(MiB)


def test_read_only_backend_hot_plugged_into_read_write_slot(rig, image):
    path = image()
    dev, _, drv = rig(None)
    assert not dev.negotiated(VIRTIO_BLK_F_RO)
    dev.set_backend(open_image(path, read_only=True)).result(5)
    assert drv.request(VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert file_bytes(path, 0, 512) == pattern(512)


def test_read_write_backend_in_a_read_only_slot_still_refuses_writes(rig, image):
    path = image()
    dev, _, drv = rig(None, read_only=True)
    assert dev.negotiated(VIRTIO_BLK_F_RO)
    dev.set_backend(open_image(path)).result(5)
    assert drv.request(VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    assert file_bytes(path, 0, 512) == pattern(512)


# -- O_DIRECT ----------------------------------------------------------------------------------------
def test_direct_aligned_is_zero_copy(rig, image, direct_dir, monkeypatch):
    path = os.path.join(direct_dir, "d.img")
    with open(path, "wb") as f:
        f.write(pattern(2 * MiB))
    be = open_image(path, direct=True)
    assert be.direct and be.align in (512, 4096)
    assert fcntl.fcntl(be.fd, fcntl.F_GETFL) & os.O_DIRECT
    copies = []
    monkeypatch.setattr(backendmod, "_copy_out", lambda *a: copies.append("out"))
    monkeypatch.setattr(backendmod, "_copy_in", lambda *a: copies.append("in"))
    _, _, drv = rig(be)
    data = pattern(64 * 1024, seed=5)
    assert drv.request(VIRTIO_BLK_T_OUT, 64, out=data)[0] == VIRTIO_BLK_S_OK  # put() aligns to 512
    status, got, _ = drv.request(VIRTIO_BLK_T_IN, 64, in_len=64 * 1024)
    assert (status, got) == (VIRTIO_BLK_S_OK, data)
    if be.align == 512:
        assert copies == []
    assert file_bytes(path, 64 * 512, 64 * 1024) == data


def test_direct_unaligned_guest_buffers_use_the_bounce_buffer(rig, direct_dir, mem, monkeypatch):
    path = os.path.join(direct_dir, "d.img")
    with open(path, "wb") as f:
        f.write(pattern(4 * MiB))
    be = open_image(path, direct=True)
    copies = []
    real_out, real_in = backendmod._copy_out, backendmod._copy_in
    monkeypatch.setattr(backendmod, "_copy_out", lambda *a: (copies.append("out"), real_out(*a)))
    monkeypatch.setattr(backendmod, "_copy_in", lambda *a: (copies.append("in"), real_in(*a)))
    _, _, drv = rig(be)
    n = 3 * MiB + 4096  # more than one bounce buffer's worth
    data = pattern(n, seed=11)
    src = drv.alloc(n + 8, 4096) + 8  # deliberately misaligned in guest memory
    mem.write(src, data)
    head, status_addr, _ = drv.post(VIRTIO_BLK_T_OUT, 8, out_addr=src, out_len=n, split=7777,
                                    indirect=True)
    drv.notify(0)
    drv.wait_used(0)
    assert mem.read_u8(status_addr) == VIRTIO_BLK_S_OK
    assert file_bytes(path, 8 * 512, n) == data
    dst = drv.alloc(n + 8, 4096) + 3
    head, status_addr, _ = drv.post(VIRTIO_BLK_T_IN, 8, in_addr=dst, in_len=n)
    drv.notify(0)
    drv.wait_used(0)
    assert mem.read_u8(status_addr) == VIRTIO_BLK_S_OK
    assert mem.read(dst, n) == data
    assert copies.count("in") >= 4 and copies.count("out") >= 4


def test_direct_unaligned_file_offset_drops_o_direct_for_that_transfer(rig, direct_dir):
    path = os.path.join(direct_dir, "d.img")
    with open(path, "wb") as f:
        f.write(pattern(MiB))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    be = FileBackend(fd, path=path, direct=True, align=4096)  # as on a 4Kn host disk
    _, _, drv = rig(be)
    data = pattern(512, seed=3)
    assert drv.request(VIRTIO_BLK_T_OUT, 1, out=data)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_IN, 1, in_len=512)[1] == data
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT  # restored
    assert drv.request(VIRTIO_BLK_T_IN, 8, in_len=4096)[1] == pattern(MiB)[4096:8192]
    assert file_bytes(path, 512, 512) == data


def test_direct_write_zeroes_fallback(rig, direct_dir, monkeypatch):
    path = os.path.join(direct_dir, "d.img")
    with open(path, "wb") as f:
        f.write(pattern(MiB))
    _, _, drv = rig(open_image(path, direct=True))
    monkeypatch.setattr(backendmod, "fallocate",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no")))
    assert drv.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segs((9, 3, 0)))[0] == VIRTIO_BLK_S_OK
    assert file_bytes(path, 9 * 512, 3 * 512) == bytes(3 * 512)
    assert file_bytes(path, 12 * 512, 512) == pattern(MiB)[12 * 512:13 * 512]


# -- host I/O errors ---------------------------------------------------------------------------------
def test_write_to_a_full_device_is_ioerr(rig):
    fd = os.open("/dev/full", os.O_RDWR)  # every write: ENOSPC, like a full filesystem
    _, t, drv = rig(FileBackend(fd, path="/dev/full", size=MiB))
    assert drv.request(VIRTIO_BLK_T_OUT, 0, out=pattern(4096))[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=4096) == (VIRTIO_BLK_S_OK, bytes(4096), 4097)
    assert not rd_status(t) & STATUS_DEVICE_NEEDS_RESET


def test_fd_without_the_needed_access_is_ioerr(rig, image, caplog):
    path = image()
    wr_only = os.open(path, os.O_WRONLY)  # reads fail with EBADF, as on a closed descriptor
    dev, t, drv = rig(FileBackend(wr_only, path=path))
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, 8, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert sum("host I/O error" in rec.message for rec in caplog.records
               if rec.levelname == "WARNING") == 1
    rd_only = os.open(path, os.O_RDONLY)
    dev.set_backend(FileBackend(rd_only, path=path)).result(5)  # claims read-write, fd cannot write
    assert drv.request(VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512)[1] == pattern(512)
    assert not rd_status(t) & STATUS_DEVICE_NEEDS_RESET


# -- malformed requests --------------------------------------------------------------------------------
def wait_needs_reset(t, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rd_status(t) & STATUS_DEVICE_NEEDS_RESET:
            return True
        time.sleep(0.002)
    return False


def test_short_header_needs_reset(rig, image):
    _, t, drv = rig(open_image(image()))
    hdr = drv.put(bytes(15))
    st_ = drv.alloc(1)
    drv.submit(0, [(hdr, 15)], [(st_, 1)])
    drv.notify(0)
    assert wait_needs_reset(t)


def test_missing_status_byte_needs_reset(rig, image):
    _, t, drv = rig(open_image(image()))
    hdr = drv.put(BLK_HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0))
    drv.submit(0, [(hdr, 16)], [])
    drv.notify(0)
    assert wait_needs_reset(t)


# -- hot-replace ---------------------------------------------------------------------------------------
def test_hot_replace_changes_capacity_generation_and_interrupts(rig, image, monkeypatch):
    a_path, b_path = image(MiB, "a.img"), image(4 * MiB, "b.img", content=pattern(4 * MiB, seed=42))
    a = open_image(a_path)
    dev, t, drv = rig(a)
    assert drv.read_config(0, 8) == 2048
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    a_fd = a.fd
    gen = t.read(r.CONFIG_GENERATION, 4)
    t.write(r.INTERRUPT_ACK, 4, 3)
    dev.set_backend(open_image(b_path)).result(5)
    assert t.read(r.CONFIG_GENERATION, 4) != gen
    assert drv.read_config(0, 8) == 8192
    assert t.read(r.INTERRUPT_STATUS, 4) & INT_CONFIG
    assert syncs == [a_fd] and a.fd == -1  # old backend flushed and closed
    assert drv.request(VIRTIO_BLK_T_IN, 6000, in_len=512)[1] == pattern(4 * MiB, seed=42)[6000 * 512:6001 * 512]

    gen = t.read(r.CONFIG_GENERATION, 4)
    dev.set_backend(None).result(5)  # device_del: an empty slot is a disk of capacity 0
    assert drv.read_config(0, 8) == 0
    assert t.read(r.CONFIG_GENERATION, 4) != gen
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=0)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_GET_ID, in_len=20)[1] == bytes(20)


def test_hot_replace_before_driver_init_raises_no_interrupt(rig, image):
    dev, t, drv = rig(None, init=False)
    gen = t.read(r.CONFIG_GENERATION, 4)
    dev.set_backend(open_image(image())).result(5)
    assert t.read(r.CONFIG_GENERATION, 4) != gen
    assert t.read(r.INTERRUPT_STATUS, 4) == 0
    drv.initialize()
    assert drv.read_config(0, 8) == 2048


def test_empty_slot(rig):
    dev, _, drv = rig(None)
    assert dev.capacity == 0 and not dev.negotiated(VIRTIO_BLK_F_RO)
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK


class SlowBackend(FileBackend):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.entered = threading.Event()
        self.finished = threading.Event()

    def readv(self, offset, views):
        self.entered.set()
        time.sleep(0.3)
        super().readv(offset, views)
        self.finished.set()


def test_hot_replace_waits_for_the_request_in_flight(rig, image, mem):
    a_path = image(MiB, "a.img", content=b"A" * MiB)
    b_path = image(MiB, "b.img", content=b"B" * MiB)
    slow = SlowBackend(os.open(a_path, os.O_RDWR), path=a_path)
    dev, _, drv = rig(slow)
    head, status_addr, data_addr = drv.post(VIRTIO_BLK_T_IN, 0, in_len=4096)
    drv.notify(0)
    assert slow.entered.wait(5)
    dev.set_backend(open_image(b_path)).result(5)
    assert slow.finished.is_set()  # set_backend returned only after the old request completed
    drv.wait_used(0)
    assert mem.read_u8(status_addr) == VIRTIO_BLK_S_OK
    assert mem.read(data_addr, 4096) == b"A" * 4096  # served by the old backend
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=4096)[1] == b"B" * 4096


def test_close_flushes_and_releases(mem, image, monkeypatch):
    be = open_image(image())
    dev = VirtioBlk(be)
    t = VirtioMmio(dev, mem)
    t.start()
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    fd = be.fd
    t.close(timeout=5)
    assert syncs == [fd] and be.fd == -1 and dev.backend is None


# -- opening drive files -------------------------------------------------------------------------------
def test_open_missing(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        open_image(str(tmp_path / "nope.img"))


def test_open_directory(tmp_path):
    with pytest.raises(BackendError, match="not a regular file or block device"):
        open_image(str(tmp_path))


def test_open_character_device():
    with pytest.raises(BackendError, match="not a regular file or block device"):
        open_image("/dev/null")


def test_open_permission_denied(image, monkeypatch):
    path = image()
    if os.geteuid() == 0:
        # root bypasses file modes; simulate the kernel's answer instead
        def deny(p, flags, *a):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(os, "open", deny)
    else:
        os.chmod(path, stat.S_IRUSR)
    with pytest.raises(BackendError, match="Permission denied .* for reading and writing"):
        open_image(path)


def test_open_read_only_filesystem_message(image, monkeypatch):
    path = image()
    monkeypatch.setattr(os, "open", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(BackendError, match="read-only filesystem"):
        open_image(path)


def test_open_direct_unsupported_at_open(image, monkeypatch):
    path = image()
    monkeypatch.setattr(os, "open", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "inval")))
    with pytest.raises(BackendError, match="does not support O_DIRECT"):
        open_image(path, direct=True)


def test_open_direct_unsupported_at_first_read(image, monkeypatch):
    path = image()
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: real_open(p, flags & ~os.O_DIRECT, *a))
    monkeypatch.setattr(os, "preadv", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "inval")))
    with pytest.raises(BackendError, match="does not support O_DIRECT"):
        open_image(path, direct=True)


def test_open_reports_size_and_mode(image):
    path = image(5 * 512 + 1)
    be = open_image(path, read_only=True)
    try:
        st = os.stat(path)
        assert (be.size, be.capacity, be.read_only, be.identity) == (5 * 512 + 1, 5, True, (st.st_dev, st.st_ino))
        assert not fcntl.fcntl(be.fd, fcntl.F_GETFL) & os.O_ACCMODE  # O_RDONLY
    finally:
        be.close()


# -- used-buffer interrupts end to end -----------------------------------------------------------------
def irq_fired(t, timeout):
    import select
    ready, _, _ = select.select([t.irq_eventfd], [], [], timeout)
    if ready:
        os.eventfd_read(t.irq_eventfd)
    return bool(ready)


@pytest.mark.parametrize("event_idx", [True, False])
def test_each_completion_interrupts_when_the_driver_asks(rig, image, event_idx):
    want = None if event_idx else bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BLK_F_FLUSH)
    dev, t, drv = rig(open_image(image()), want=want)
    assert dev.negotiated(VIRTIO_RING_F_EVENT_IDX) == event_idx
    for i in range(20):
        if event_idx:
            drv.set_used_event(0, drv.queues[0].last_used)  # "interrupt me for the next one"
        irq_fired(t, 0)
        drv.post(VIRTIO_BLK_T_OUT, i, out=pattern(512, i))
        drv.notify(0)
        assert irq_fired(t, 2.0), f"request {i}: no used-buffer interrupt"
        assert len(drv.take_used(0)) == 1


@pytest.mark.parametrize("event_idx", [True, False])
def test_interrupts_suppressed_when_the_driver_says_so(rig, image, mem, event_idx):
    want = None if event_idx else bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BLK_F_FLUSH)
    _, t, drv = rig(open_image(image()), want=want)
    q = drv.queues[0]
    drv.request(VIRTIO_BLK_T_FLUSH)  # the device's first decision always interrupts
    if event_idx:
        drv.set_used_event(0, (q.last_used + 5) & 0xFFFF)
    else:
        mem.write_u16(q.avail, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    irq_fired(t, 0)
    for _ in range(3):
        drv.post(VIRTIO_BLK_T_FLUSH)
        drv.notify(0)
        deadline = time.monotonic() + 5
        while drv.used_idx(0) == q.last_used and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(drv.take_used(0)) == 1
    assert not irq_fired(t, 0.05)


# -- concurrency -----------------------------------------------------------------------------------------
def test_reset_waits_for_the_request_in_flight(rig, image, mem):
    path = image(MiB, "a.img", content=b"A" * MiB)
    slow = SlowBackend(os.open(path, os.O_RDWR), path=path)
    dev, t, drv = rig(slow)
    head, status_addr, data_addr = drv.post(VIRTIO_BLK_T_IN, 0, in_len=4096)
    drv.notify(0)
    assert slow.entered.wait(5)
    t.write(r.STATUS, 4, 0)  # the vCPU's reset blocks until the device is quiescent
    assert slow.finished.is_set()
    assert not dev.active and t.read(r.STATUS, 4) == 0
    assert mem.read_u8(status_addr) == VIRTIO_BLK_S_OK  # it completed before the reset
    drv.initialize()
    assert drv.request(VIRTIO_BLK_T_IN, 0, in_len=512)[1] == b"A" * 512


def test_hot_replace_under_load(rig, image, mem):
    a_path = image(MiB, "a.img", content=b"A" * MiB)
    b_path = image(2 * MiB, "b.img", content=b"B" * (2 * MiB))
    dev, t, drv = rig(open_image(a_path))
    stop = threading.Event()
    seen = set()
    errors = []

    def swapper():
        for i in range(30):
            dev.set_backend(open_image(b_path if i % 2 == 0 else a_path)).result(5)
            time.sleep(0.002)
        stop.set()

    th = threading.Thread(target=swapper)
    th.start()
    try:
        while not stop.is_set():
            posted = [drv.post(VIRTIO_BLK_T_IN, 8 * i, in_len=4096, publish=False, indirect=True)
                      for i in range(16)]
            drv.publish(0)
            drv.notify(0)
            drv.wait_used(0, 16, timeout=10)
            for _, status_addr, data_addr in posted:
                status = mem.read_u8(status_addr)
                if status != VIRTIO_BLK_S_OK:
                    errors.append(status)
                    continue
                data = mem.read(data_addr, 4096)
                assert data in (b"A" * 4096, b"B" * 4096)  # one backend or the other, never torn
                seen.add(data[:1])
            drv.data.reset()
    finally:
        th.join()
    assert not t.read(r.STATUS, 4) & STATUS_DEVICE_NEEDS_RESET
    assert not errors  # sectors 0..127 exist on both disks
    assert seen  # requests completed during the swaps
