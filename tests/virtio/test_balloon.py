"""Unit tests of the virtio-balloon device model (no KVM): StratoVirt's config arithmetic, the
driver's ``actual``, inflate/deflate against real guest memory (host RSS really drops), PFN
validation, run merging around the 32-bit hole, host pages larger than 4 KiB, malformed
requests, the statistics queue, and property tests of random PFN lists."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystratovirt.memory.guest import GuestMemory
from pystratovirt.memory.layout import GiB, MiB
from pystratovirt.virtio import mmio as r
from pystratovirt.virtio.balloon import (
    BATCH,
    MAX_REQUEST_BYTES,
    STAT_NAMES,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_ID_BALLOON,
    PageBitmap,
    VirtioBalloon,
    merge_runs,
)
from pystratovirt.virtio.device import INT_CONFIG, VIRTIO_F_VERSION_1, Interrupt, bit
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import VirtioDriver
from pystratovirt.virtio.queue import SplitQueue
from virtio.helper import WRITE, Ring

PAGE = 4096
HOLE_START, HOLE_END = 3 * GiB, 4 * GiB


class RecordingMemory(GuestMemory):
    """GuestMemory that records every discard; ``real=False`` records without madvise (for
    random PFNs that may name the test's own rings)."""

    def __init__(self, size: int, real: bool = True):
        super().__init__(size)
        self.real = real
        self.discards: list[tuple[int, int]] = []

    def discard(self, gpa, length):
        self.discards.append((gpa, length))
        if self.real:
            super().discard(gpa, length)


def pfn_bytes(pfns) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def pages_of(ranges) -> set[int]:
    return {gpa // PAGE + i for gpa, length in ranges for i in range(length // PAGE)}


# -- direct harness: the device with hand-built rings, processed synchronously -----------------------
class Direct:
    """The balloon activated over hand-written rings (queues at 64 KiB, PFN buffers at 128 KiB),
    its queues processed on the calling thread as the I/O thread would."""

    def __init__(self, mem: GuestMemory, dev: VirtioBalloon | None = None, *, features: int | None = None):
        self.mem = mem
        self.dev = dev or VirtioBalloon(mem.size)
        self.rings = []
        queues = []
        for i in range(len(self.dev.queue_max_sizes)):
            base = 0x10000 + i * 0x4000
            ring = Ring(mem, 256, desc=base, avail=base + 0x1000, used=base + 0x2000)
            mem.fill(base, 0x4000)
            self.rings.append(ring)
            queues.append(SplitQueue(mem, 256, ring.desc, ring.avail, ring.used))
        self.interrupt = Interrupt()
        if features is None:
            features = self.dev.device_features()
        self.dev.activate(mem, queues, self.interrupt, features)
        self.next_buf = 0x20000
        self.next_desc = [0] * len(self.rings)

    def post(self, qi: int, data: bytes, flags: int = 0) -> int:
        ring = self.rings[qi]
        addr = self.next_buf
        self.next_buf += (len(data) + 15) & ~15
        self.mem.write(addr, data)
        d = self.next_desc[qi] % 256
        self.next_desc[qi] += 1
        ring.set_desc(d, addr, len(data), flags)
        ring.push(d)
        return d

    def run(self, qi: int) -> None:
        with self.dev.lock:
            while self.dev.process_queue(qi):
                pass

    def request(self, qi: int, pfns) -> None:
        self.post(qi, pfn_bytes(pfns))
        self.run(qi)
        self.next_buf = 0x20000  # the request is done with its buffer

    def close(self) -> None:
        self.interrupt.close()
        self.dev.close()


@pytest.fixture
def small():
    mem = RecordingMemory(64 * MiB)
    d = Direct(mem)
    yield d
    d.close()
    mem.close()


@pytest.fixture(scope="module")
def big_mem():
    """5 GiB of MAP_NORESERVE RAM: [0, 3 GiB) and [4 GiB, 6 GiB). Discards are only recorded, so
    the module can share it."""
    mem = RecordingMemory(5 * GiB, real=False)
    yield mem
    mem.close()


@pytest.fixture
def big(big_mem):
    big_mem.discards.clear()
    d = Direct(big_mem)
    yield d
    d.close()


# -- config arithmetic ------------------------------------------------------------------------------
def test_seed_example_4g_to_2g():
    dev = VirtioBalloon(4 * GiB)
    assert dev.actual_bytes() == 4 * GiB  # right after boot: the configured memory
    assert dev.set_target(2 * GiB) == 524288
    assert dev.num_pages == 524288
    assert dev.read_config(0, 4) == 524288
    assert dev.target_bytes() == 2 * GiB
    # The guest gives the pages and reports them: query-balloon then answers 2147483648.
    dev.write_config(4, 4, 524288)
    assert dev.actual_bytes() == 2147483648


@pytest.mark.parametrize("value, num_pages", [
    (8 * GiB, 0),                  # above RAM: all of it
    (4 * GiB, 0),
    (0, 1 << 20),                  # everything into the balloon
    (2 * GiB + 4095, 524288),      # a partial page does not count
    (PAGE, (1 << 20) - 1),
])
def test_target_arithmetic(value, num_pages):
    dev = VirtioBalloon(4 * GiB)
    assert dev.set_target(value) == num_pages
    assert dev.read_config(0, 4) == num_pages


def test_target_bumps_generation_and_rejects_negative():
    dev = VirtioBalloon(256 * MiB)
    gen = dev.config_generation
    dev.set_target(128 * MiB)
    dev.set_target(128 * MiB)
    assert dev.config_generation == gen + 2
    with pytest.raises(ValueError):
        dev.set_target(-1)


def test_config_reads_at_any_aligned_offset():
    dev = VirtioBalloon(4 * GiB)
    dev.set_target(2 * GiB)             # num_pages 0x80000
    dev.write_config(4, 4, 0x1234_5678)
    assert dev.read_config(0, 4) == 0x80000
    assert dev.read_config(4, 4) == 0x1234_5678
    assert dev.read_config(0, 8) == 0x1234_5678_0008_0000
    assert dev.read_config(2, 2) == 0x0008
    assert dev.read_config(6, 2) == 0x1234
    assert dev.read_config(7, 1) == 0x12
    assert dev.read_config(8, 4) == 0     # past the end


def test_actual_written_by_driver_and_callback():
    seen = []
    dev = VirtioBalloon(4 * GiB, on_actual_changed=seen.append)
    gen = dev.config_generation
    dev.write_config(4, 4, 1000)
    assert dev.actual_pages == 1000
    assert dev.actual_bytes() == 4 * GiB - 1000 * PAGE
    assert seen == [4 * GiB - 1000 * PAGE]
    dev.write_config(4, 4, 1000)          # the same value again: not a change
    assert len(seen) == 1
    dev.write_config(0, 4, 77)            # num_pages is the host's: ignored
    assert dev.num_pages == 0 and len(seen) == 1
    dev.write_config(4, 2, 0x0002)        # narrow writes change only their bytes
    assert dev.actual_pages == 2
    dev.write_config(0, 8, 5 << 32 | 99)  # an 8-byte write: the upper half is actual
    assert dev.actual_pages == 5 and dev.num_pages == 0
    assert seen[-1] == 4 * GiB - 5 * PAGE
    assert dev.config_generation == gen   # driver writes are not device changes


def test_actual_claiming_more_than_ram_reports_zero():
    dev = VirtioBalloon(128 * MiB)
    dev.write_config(4, 4, 0xFFFF_FFFF)
    assert dev.actual_bytes() == 0


def test_callback_failure_is_contained():
    def boom(_):
        raise RuntimeError("machine bug")
    dev = VirtioBalloon(128 * MiB, on_actual_changed=boom)
    dev.write_config(4, 4, 1)
    assert dev.actual_pages == 1


def test_features():
    assert VirtioBalloon(GiB).device_features() == (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_STATS_VQ))
    assert VirtioBalloon(GiB, stats=False).device_features() == bit(VIRTIO_F_VERSION_1)
    assert VirtioBalloon(GiB, stats=False, deflate_on_oom=True).device_features() == \
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    assert VirtioBalloon(GiB).queue_max_sizes == (256, 256, 256)
    assert VirtioBalloon(GiB, stats=False).queue_max_sizes == (256, 256)
    with pytest.raises(ValueError):
        VirtioBalloon(GiB, host_page_size=6000)


# -- through the virtio-mmio transport with the test driver -----------------------------------------
class Machine:
    """A balloon behind VirtioMmio with its I/O thread running, and a driver playing the guest."""

    def __init__(self, mem: GuestMemory, **kwargs):
        self.mem = mem
        self.changes: list[int] = []
        self.dev = VirtioBalloon(mem.size, on_actual_changed=self.changes.append, **kwargs)
        self.t = VirtioMmio(self.dev, mem)
        self.t.start()
        self.drv = VirtioDriver(self.t, mem)

    def pfn_requests(self, qi: int, pfns, per_buffer: int = 256) -> None:
        """Post PFNs in Linux-sized buffers (256 per buffer) and wait for all of them."""
        heads = []
        for i in range(0, len(pfns), per_buffer):
            addr = self.drv.put(pfn_bytes(pfns[i:i + per_buffer]))
            heads.append(self.drv.submit(qi, [(addr, 4 * len(pfns[i:i + per_buffer]))], []))
            if len(self.drv.queues[qi].free) == 0:
                self.drv.notify(qi)
                self.drv.wait_used(qi, len(heads))
                heads = []
        self.drv.notify(qi)
        if heads:
            got = self.drv.wait_used(qi, len(heads))
            assert all(length == 0 for _, length in got)
        self.drv.data.reset()

    def close(self) -> None:
        self.t.close(5)


@pytest.fixture
def machine():
    made = []

    def make(size=256 * MiB, **kwargs):
        mem = GuestMemory(size)
        m = Machine(mem, **kwargs)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()
        m.mem.close()


def test_transport_identity_and_config_interrupt(machine):
    m = machine(4 * GiB, deflate_on_oom=True)
    assert m.drv.rd(r.DEVICE_ID) == VIRTIO_ID_BALLOON
    features = m.drv.initialize()
    assert features & bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    gen = m.drv.rd(r.CONFIG_GENERATION)
    m.dev.set_target(2 * GiB)
    assert m.drv.wait_irq() & INT_CONFIG
    assert m.drv.rd(r.CONFIG_GENERATION) != gen
    # Linux reads the two fields with separate 4-byte accesses.
    assert m.drv.read_config(0, 4) == 524288
    assert m.drv.read_config(4, 4) == 0
    m.t.write(r.CONFIG + 4, 4, 524288)
    assert m.dev.actual_bytes() == 2 * GiB
    assert m.changes == [2 * GiB]


def smaps_rss(addr: int) -> int:
    """Rss in bytes of this process's mapping containing host address ``addr``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping contains {addr:#x}")


def test_inflate_really_gives_memory_back_to_the_host(machine):
    m = machine(256 * MiB)
    m.drv.initialize()
    start, size = 64 * MiB, 64 * MiB
    for gpa in range(start, start + size, PAGE):
        m.mem.write_u8(gpa, 0xA5)         # make every page resident
    before = smaps_rss(m.mem.host_base)
    pfns = list(range(start // PAGE, (start + size) // PAGE))
    m.pfn_requests(0, pfns)
    after = smaps_rss(m.mem.host_base)
    dropped = before - after
    print(f"\nballoon RSS: {before / MiB:.1f} MiB -> {after / MiB:.1f} MiB, dropped {dropped / MiB:.1f} MiB "
          f"of {size / MiB:.0f} MiB inflated")
    assert dropped >= 0.9 * size
    assert m.dev.ballooned_pages() == len(pfns)
    assert m.mem.read(start, PAGE) == bytes(PAGE)  # released: it reads back as a zero page
    # Deflate: the pages are the guest's again and fault back in when written.
    m.pfn_requests(1, pfns)
    assert m.dev.ballooned_pages() == 0
    m.mem.write(start, b"back")
    assert m.mem.read(start, 4) == b"back"
    assert not m.t.needs_reset


def test_inflate_with_mincore_precision(machine):
    """The exact pages released and no others: residency per page via mincore()."""
    import ctypes
    import mmap as _mmap
    libc = ctypes.CDLL(None, use_errno=True)
    m = machine(32 * MiB)
    m.drv.initialize()
    area, npages = 16 * MiB, 64
    for i in range(npages):
        m.mem.write_u8(area + i * PAGE, 1)
    m.pfn_requests(0, [area // PAGE + i for i in range(0, npages, 2)])  # every other page
    vec = (ctypes.c_ubyte * npages)()
    host = m.mem.host_address(area, npages * PAGE)
    assert host % _mmap.PAGESIZE == 0
    assert libc.mincore(ctypes.c_void_p(host), ctypes.c_size_t(npages * PAGE), vec) == 0
    assert [v & 1 for v in vec] == [0, 1] * (npages // 2)


# -- PFN validation, duplicates, merging ------------------------------------------------------------
def test_runs_are_merged(small):
    small.request(0, [0x1003, 0x1001, 0x1002, 0x1000, 0x2000, 0x1005])
    assert small.mem.discards == [(0x1000 * PAGE, 4 * PAGE), (0x1005 * PAGE, PAGE), (0x2000 * PAGE, PAGE)]
    assert small.rings[0].used_idx() == 1
    assert small.rings[0].used_elem(0) == (0, 0)


def test_duplicates_and_double_inflate_are_harmless(small):
    small.request(0, [0x1000] * 50 + [0x1001])
    assert small.mem.discards == [(0x1000 * PAGE, 2 * PAGE)]
    small.mem.discards.clear()
    small.request(0, [0x1000, 0x1001])     # already in the balloon: nothing to do
    assert small.mem.discards == []
    assert small.dev.ballooned_pages() == 2
    small.request(1, [0x1000, 0x1000, 0x3000])  # deflating a page not in the balloon is harmless
    assert small.dev.ballooned_pages() == 1
    small.request(0, [0x1000])             # re-inflated after the guest reused it: released again
    assert small.mem.discards == [(0x1000 * PAGE, PAGE)]


def test_out_of_range_pfns_are_skipped(big, caplog):
    last_pfn = (6 * GiB) // PAGE - 1
    pfns = [5, HOLE_START // PAGE, HOLE_END // PAGE - 1, last_pfn + 1, 0xFFFF_FFFF, last_pfn]
    big.request(0, pfns)
    assert sorted(big.mem.discards) == [(5 * PAGE, PAGE), (last_pfn * PAGE, PAGE)]
    assert big.rings[0].used_idx() == 1
    assert "outside guest RAM" in caplog.text
    big.request(1, pfns)  # the same on deflate
    assert big.dev.ballooned_pages() == 0


def test_runs_split_at_the_32bit_hole(big):
    # Contiguous in the host mapping (the high region follows the low one there), but not in
    # guest physical space: two runs, one per RAM region.
    below = [HOLE_START // PAGE - 2, HOLE_START // PAGE - 1]
    above = [HOLE_END // PAGE, HOLE_END // PAGE + 1]
    hole = [HOLE_START // PAGE, (HOLE_START + HOLE_END) // 2 // PAGE]
    big.request(0, above + hole + below)
    assert big.mem.discards == [(HOLE_START - 2 * PAGE, 2 * PAGE), (HOLE_END, 2 * PAGE)]
    for gpa, length in big.mem.discards:
        assert any(reg.contains(gpa, length) for reg in big.mem.regions)


def test_large_real_release_across_the_hole():
    """Real MADV_DONTNEED on both sides of the hole of a 5 GiB MAP_NORESERVE memory."""
    mem = RecordingMemory(5 * GiB)
    d = Direct(mem)
    try:
        for gpa in (HOLE_START - PAGE, HOLE_END):
            mem.write_u8(gpa, 7)
        d.request(0, [HOLE_START // PAGE - 1, HOLE_END // PAGE])
        assert mem.discards == [(HOLE_START - PAGE, PAGE), (HOLE_END, PAGE)]
        assert mem.read_u8(HOLE_START - PAGE) == 0 and mem.read_u8(HOLE_END) == 0
    finally:
        d.close()
        mem.close()


# -- host pages larger than 4 KiB -------------------------------------------------------------------
def test_large_host_pages_released_only_when_whole():
    mem = RecordingMemory(16 * MiB)
    dev = VirtioBalloon(mem.size, host_page_size=16384)
    d = Direct(mem, dev)
    try:
        base = 0x400  # PFN of a 16 KiB-aligned page
        for gpa in range(base * PAGE, base * PAGE + 16384, PAGE):
            mem.write_u8(gpa, 9)
        d.request(0, [base, base + 1, base + 3])
        assert mem.discards == []                       # one sub-page still the guest's
        assert mem.read_u8(base * PAGE + 2 * PAGE) == 9
        d.request(0, [base + 2])
        assert mem.discards == [(base * PAGE, 16384)]
        d.request(1, [base + 1])                        # the guest takes one back and uses it
        d.request(0, [base + 1])                        # ... and gives it again
        assert mem.discards == [(base * PAGE, 16384)] * 2
        # Neighbouring whole host pages merge into one run.
        mem.discards.clear()
        d.request(0, list(range(base + 4, base + 12)))
        assert mem.discards == [((base + 4) * PAGE, 32768)]
    finally:
        d.close()
        mem.close()


# -- malformed requests -----------------------------------------------------------------------------
def test_bad_payloads_are_completed_without_effect(small, caplog):
    small.post(0, b"\x00\x10\x00")                          # 3 bytes: not a whole PFN
    small.post(0, pfn_bytes([0x1000]), flags=WRITE)          # device-writable on inflate
    small.run(0)
    assert small.mem.discards == []
    assert small.rings[0].used_idx() == 2
    assert "not a whole number" in caplog.text and "device-writable" in caplog.text


def test_oversized_request_is_refused(small):
    small.post(0, bytes(MAX_REQUEST_BYTES + 4))
    small.run(0)
    assert small.mem.discards == [] and small.rings[0].used_idx() == 1


def test_pfn_split_across_descriptors(small):
    data = pfn_bytes([0x1000, 0x1001])
    ring = small.rings[0]
    small.mem.write(0x30000, data[:3])
    small.mem.write(0x31000, data[3:])
    ring.set_desc(0, 0x30000, 3, 1, 1)   # NEXT
    ring.set_desc(1, 0x31000, 5)
    ring.push(0)
    small.run(0)
    assert small.mem.discards == [(0x1000 * PAGE, 2 * PAGE)]


def test_batching_returns_more(small):
    for i in range(BATCH + 3):
        small.post(0, pfn_bytes([0x1000 + i]))
    with small.dev.lock:
        assert small.dev.process_queue(0) is True
        assert small.dev.process_queue(0) is False
    assert small.rings[0].used_idx() == BATCH + 3


def test_malformed_chain_sets_needs_reset_not_a_crash(machine):
    m = machine(32 * MiB)
    m.drv.initialize()
    m.drv.submit(0, [(0xFFFF_0000_0000, 4)], [])   # outside RAM: the queue layer refuses it
    m.drv.notify(0)
    for _ in range(100):
        if m.t.needs_reset:
            break
        m.drv.wait_irq(0.05)
    assert m.t.needs_reset


# -- reset ------------------------------------------------------------------------------------------
def test_reset_empties_the_balloon_and_keeps_the_target(small):
    seen = []
    small.dev.on_actual_changed = seen.append
    small.dev.set_target(32 * MiB)
    small.request(0, [0x1000, 0x1001])
    small.dev.write_config(4, 4, 2)
    with small.dev.lock:
        small.dev.reset()
    assert small.dev.actual_pages == 0 and seen[-1] == 64 * MiB
    assert small.dev.num_pages == 8192
    assert small.dev.ballooned_pages() == 0


# -- statistics -------------------------------------------------------------------------------------
def stats_bytes(entries) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in entries)


def test_stats_queue_round_trip(machine):
    m = machine(64 * MiB)
    m.drv.initialize()
    assert len(m.drv.queues) == 3
    assert m.dev.latest_stats() is None
    buf = m.drv.put(stats_bytes([(4, 123 * MiB), (5, 512 * MiB), (99, 1), (2, 7)]))
    head = m.drv.submit(2, [(buf, 40)], [])
    m.drv.notify(2)
    for _ in range(200):
        if m.dev.latest_stats() is not None:
            break
        m.drv.wait_irq(0.01)
    stats = m.dev.latest_stats()
    assert stats.values == {"free-memory": 123 * MiB, "total-memory": 512 * MiB, "major-faults": 7}
    assert stats.values["free-memory"] == 123 * MiB and stats.timestamp > 0
    assert m.drv.take_used(2) == []              # the device holds the buffer
    # Ask for fresh statistics: the buffer comes back (used length 0) with an interrupt.
    assert m.dev.request_stats() is True
    assert m.dev.request_stats() is False        # nothing held any more
    assert m.drv.wait_used(2, 1) == [(head, 0)]
    m.mem.write(buf, stats_bytes([(4, 100 * MiB), (5, 512 * MiB), (6, 200 * MiB), (2, 8)]))
    m.drv.submit(2, [(buf, 40)], [])
    m.drv.notify(2)
    for _ in range(200):
        if m.dev.latest_stats() is not stats:
            break
        m.drv.wait_irq(0.01)
    new = m.dev.latest_stats()
    assert new.values["free-memory"] == 100 * MiB and new.values["available-memory"] == 200 * MiB
    assert new.timestamp >= stats.timestamp


def test_stats_ignored_without_the_feature(machine):
    m = machine(64 * MiB)
    m.drv.initialize(want=bit(VIRTIO_F_VERSION_1))
    buf = m.drv.put(stats_bytes([(4, 1)]))
    m.drv.submit(2, [(buf, 10)], [])
    m.drv.notify(2)
    m.drv.wait_irq(0.1)
    assert m.dev.latest_stats() is None and m.drv.take_used(2) == []
    assert m.dev.request_stats() is False


def test_stats_malformed_buffers(small, caplog):
    # A partial trailing entry is ignored; the buffer is held.
    small.post(2, stats_bytes([(4, 42)]) + b"\x05\x00")
    small.run(2)
    assert small.dev.latest_stats().values == {"free-memory": 42}
    assert small.rings[2].used_idx() == 0
    # A second buffer while one is held: the old one goes back, the new one is held.
    small.post(2, stats_bytes([(4, 43)]))
    small.run(2)
    assert small.rings[2].used_idx() == 1 and small.rings[2].used_elem(0) == (0, 0)
    assert small.dev.latest_stats().values == {"free-memory": 43}
    # A device-writable buffer is returned unread; the held one stays held.
    small.post(2, stats_bytes([(4, 44)]), flags=WRITE)
    small.run(2)
    assert small.rings[2].used_idx() == 2 and small.dev.latest_stats().values == {"free-memory": 43}
    assert "device-writable" in caplog.text
    assert small.dev.request_stats() is True
    assert small.rings[2].used_idx() == 3 and small.rings[2].used_elem(2) == (1, 0)


def test_stat_names_follow_the_spec():
    assert STAT_NAMES[4] == "free-memory" and STAT_NAMES[5] == "total-memory"
    assert sorted(STAT_NAMES) == list(range(10))


# -- helpers ----------------------------------------------------------------------------------------
def test_merge_runs_and_bitmap():
    assert merge_runs([]) == []
    assert merge_runs([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 1), (9, 2)]
    bm = PageBitmap(100)
    assert bm.set(5) and not bm.set(5) and bm.count == 1
    assert bm.all_set(5, 1) and not bm.all_set(4, 2) and not bm.all_set(99, 2)
    assert bm.clear(5) and not bm.clear(5) and bm.count == 0
    bm.close()


# -- property tests ---------------------------------------------------------------------------------
LOW_END = HOLE_START // PAGE
HIGH_START, HIGH_END = HOLE_END // PAGE, (6 * GiB) // PAGE
interesting_pfn = st.one_of(
    st.integers(0, 64),                                      # low memory
    st.integers(LOW_END - 40, LOW_END + 40),                 # the start of the hole
    st.integers(HIGH_START - 40, HIGH_START + 40),           # the end of the hole
    st.integers(HIGH_END - 40, HIGH_END + 40),               # the end of RAM
    st.integers(0, 0xFFFF_FFFF),                             # anything a u32 holds
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.lists(interesting_pfn, max_size=300), min_size=1, max_size=4))
def test_discards_are_exactly_the_valid_new_pages(big_mem, requests):
    big_mem.discards.clear()
    d = Direct(big_mem)
    try:
        valid = region_pfns_fast(big_mem)
        expected: set[int] = set()
        for pfns in requests:
            before = len(big_mem.discards)
            d.request(0, pfns)
            ranges = big_mem.discards[before:]
            # Each run lies in one RAM region; runs of one request are disjoint and maximal.
            for gpa, length in ranges:
                assert length > 0 and gpa % PAGE == 0 and length % PAGE == 0
                assert any(reg.contains(gpa, length) for reg in big_mem.regions)
            ordered = sorted(ranges)
            for (a, la), (b, _) in itertools.pairwise(ordered):
                assert a + la < b  # adjacent runs would have been merged
            new = {p for p in pfns if valid(p)} - expected
            assert pages_of(ranges) == new
            assert sum(length for _, length in ranges) == len(new) * PAGE  # no page twice
            expected |= new
        assert d.dev.ballooned_pages() == len(expected)
        d.request(1, [p for pfns in requests for p in pfns])
        assert d.dev.ballooned_pages() == 0
    finally:
        d.close()


def region_pfns_fast(mem: GuestMemory):
    spans = [(reg.gpa // PAGE, reg.end // PAGE) for reg in mem.regions]
    return lambda p: any(lo <= p < hi for lo, hi in spans)


@settings(max_examples=200, deadline=None)
@given(pages=st.sets(st.integers(0, 255), max_size=256), sub=st.sampled_from([1, 2, 4, 16]),
       order=st.randoms(use_true_random=False))
def test_large_host_page_rule(pages, sub, order):
    """With host pages of ``sub`` balloon pages, exactly the host pages whose every sub-page was
    inflated are released, whatever the order and batching of the requests."""
    mem = RecordingMemory(4 * MiB, real=False)   # 1024 balloon pages; PFNs 0..255 are in RAM
    dev = VirtioBalloon(mem.size, host_page_size=PAGE * sub)
    d = Direct(mem, dev)
    try:
        items = sorted(pages)
        order.shuffle(items)
        while items:
            n = order.randint(1, 40)
            d.request(0, items[:n])
            items = items[n:]
        released = pages_of(mem.discards)
        assert sum(length for _, length in mem.discards) == len(released) * PAGE
        whole = {h for h in range(256 // sub) if all(h * sub + i in pages for i in range(sub))}
        assert released == {h * sub + i for h in whole for i in range(sub)}
    finally:
        d.close()
        mem.close()
