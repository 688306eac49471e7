"""virtio-balloon (device id 5, virtio 1.x §5.5, the traditional memory balloon): giving guest
memory back to the host.

Owns: the balloon's config space (``num_pages`` written by the host, ``actual`` written by the
driver) and StratoVirt's arithmetic over it; the inflate and deflate queues, which turn guest
page frame numbers into MADV_DONTNEED on the host mapping of guest RAM; the record of which
pages are in the balloon; and the optional statistics queue.

Arithmetic (StratoVirt's contract, see the research notes §4). PFNs are always of 4 KiB pages
(VIRTIO_BALLOON_PFN_SHIFT = 12) whatever the host or guest page size; ``ram_pages`` is the
configured RAM in bytes >> 12.

* ``set_target(value)``: ``num_pages = ram_pages - min(value >> 12, ram_pages)``, then a
  config-change interrupt. A value above RAM means "give nothing back".
* ``actual_bytes()``: ``ram_bytes - (actual << 12)`` from what the driver last wrote -- the
  truth the guest reports, not the target.

Inflate (queue 0): every u32 PFN is checked against guest RAM (out of range: logged and skipped,
never passed to madvise); the valid pages are deduplicated, recorded in a bitmap of the pages in
the balloon, and the *newly* ballooned ones sorted, merged into contiguous runs and released with
``GuestMemory.discard`` (MADV_DONTNEED), one call per run, each run inside one RAM region. So a
double inflate is a no-op, and the host's RSS really drops: private anonymous memory that has
been MADV_DONTNEED'd is freed at once and refaults as zero pages when touched.

Host pages larger than 4 KiB (``mmap.PAGESIZE``, e.g. 64 KiB on some arm64 hosts): a host page
is only released once every 4 KiB sub-page of it is in the balloon; discarding it earlier would
zero guest data living in its other sub-pages. The bitmap is indexed by the 4 KiB page's offset
in the host mapping, so host pages are just aligned groups of bits.

Deflate (queue 1): the pages leave the bitmap and nothing else happens. MADV_DONTNEED'd private
anonymous memory refaults on touch, so VIRTIO_BALLOON_F_MUST_TELL_HOST is not offered (the guest
may reuse a page before telling us) and no MADV_WILLNEED is issued: for anonymous memory it only
starts swap-in readahead, and a discarded page is not in swap -- it would do nothing.

Other kinds of guest RAM (the VMM currently maps only private anonymous memory): on a shared or
file-backed mapping MADV_DONTNEED only drops this process's page-table entries -- the page cache
or the shared object keeps the memory (freeing it needs fallocate(PUNCH_HOLE)) and a MAP_PRIVATE
file mapping refaults the *file's* contents; on hugetlbfs MADV_DONTNEED of less than a huge page
fails with EINVAL, which is why StratoVirt skips madvise when any region uses huge pages. Here a
failing madvise is logged and the page stays recorded as ballooned; correctness never depends on
the release succeeding, because a ballooned page's contents are undefined to the guest anyway.

Statistics (queue 2, only with VIRTIO_BALLOON_F_STATS_VQ): the driver keeps one device-readable
buffer of packed ``(u16 tag, u64 value)`` entries made available. The device reads it when it
arrives, records the values it knows (unknown tags are ignored, §5.5.6.3) with the time, and
*holds* the buffer; :meth:`VirtioBalloon.request_stats` returns it to the driver (used length 0),
which is how the spec lets the device ask for fresh statistics: the driver refills and re-posts
the same buffer.

Malformed requests are never fatal: a chain that cannot be walked raises QueueError in the queue
layer (the transport then sets DEVICE_NEEDS_RESET); a chain with a bad payload (a device-writable
buffer, a length that is not a whole number of PFNs or stat entries, too large) is logged and
completed without touching memory.

Reporting and polling, owned by the device on its I/O thread (``self.io``): with
``report_interval`` set, changes of ``actual`` are coalesced into calls of ``on_actual_changed``
(QMP's BALLOON_CHANGED): the first change at once, later ones at most once per interval while
the size keeps moving, and the settled value always; :meth:`set_stats_interval` asks the driver
for fresh statistics every so many seconds (QEMU's ``guest-stats-polling-interval``).

Threading (see device.py): queues, the report timer and the statistics timer run on the I/O
thread, queue work with ``self.lock`` held. ``set_target``, ``request_stats`` and
``set_stats_interval`` may be called from any thread (the control loop does); config reads and
the driver's write of ``actual`` arrive on vCPU threads and only take the short config lock.
Without ``report_interval`` (unit tests driving the device directly) ``on_actual_changed`` runs at
once on the vCPU thread whose config write changed ``actual`` (no device lock held), or on the
vCPU thread resetting the device (``actual`` drops to 0; the transport's register lock and
``self.lock`` are held then); either way it must be quick and must not call back into this
device or its transport.
"""

from __future__ import annotations

import logging
import mmap
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..memory.guest import GuestMemory, GuestMemoryError
from ..util.eventloop import Timer
from .device import Interrupt, VirtioDevice, VirtioState, bit
from .queue import DescChain, SplitQueue, read_buffers

log = logging.getLogger(__name__)

VIRTIO_ID_BALLOON = 5
QUEUE_SIZE = 256
INFLATE_QUEUE = 0
DEFLATE_QUEUE = 1
STATS_QUEUE = 2

# Feature bits (spec §5.5.3).
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2

# PFNs name 4 KiB frames whatever the page sizes of host and guest (spec §5.5.6).
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT

# struct virtio_balloon_config without the fields of features we do not offer.
CONFIG = struct.Struct("<II")
CONFIG_NUM_PAGES = 0
CONFIG_ACTUAL = 4

PFN_SIZE = 4
STAT = struct.Struct("<HQ")   # struct virtio_balloon_stat, packed: 10 bytes

# Statistic tags (spec §5.5.6.3) and the names latest_stats() reports them under.
STAT_NAMES: Mapping[int, str] = {
    0: "swap-in",              # VIRTIO_BALLOON_S_SWAP_IN, bytes
    1: "swap-out",             # VIRTIO_BALLOON_S_SWAP_OUT, bytes
    2: "major-faults",         # VIRTIO_BALLOON_S_MAJFLT
    3: "minor-faults",         # VIRTIO_BALLOON_S_MINFLT
    4: "free-memory",          # VIRTIO_BALLOON_S_MEMFREE, bytes
    5: "total-memory",         # VIRTIO_BALLOON_S_MEMTOT, bytes
    6: "available-memory",     # VIRTIO_BALLOON_S_AVAIL, bytes
    7: "disk-caches",          # VIRTIO_BALLOON_S_CACHES, bytes
    8: "hugetlb-allocations",  # VIRTIO_BALLOON_S_HTLB_PGALLOC
    9: "hugetlb-failures",     # VIRTIO_BALLOON_S_HTLB_PGFAIL
}

# Chains handled per process_queue call before the used interrupt and a chance for a reset
# waiting on the device lock.
BATCH = 32
# Linux sends at most 256 PFNs (1 KiB) per buffer. A larger request is legal, but an unbounded
# one would make this thread copy (and a vCPU resetting the device wait for) gigabytes of PFNs:
# 1 MiB of PFNs describes 1 GiB of guest memory, far more than any driver batches.
MAX_REQUEST_BYTES = 1 << 20
MAX_STATS_BYTES = 64 * STAT.size
# The ballooned-page bitmap is saved in pieces of this many bytes (32 MiB of guest RAM each);
# all-zero pieces are left out.
BITMAP_CHUNK = 1024


@dataclass(frozen=True)
class BalloonStats:
    """The last statistics the driver posted: ``values`` by name (see STAT_NAMES; memory sizes in
    bytes), ``timestamp`` when they arrived (time.time(), seconds since the epoch)."""

    values: Mapping[str, int]
    timestamp: float


@dataclass(frozen=True)
class _RamSpan:
    """One RAM region in balloon pages: PFNs [first_pfn, end_pfn) live at bitmap index first_index."""

    first_pfn: int
    end_pfn: int
    first_index: int
    gpa: int
    offset: int   # host mapping offset of gpa
    size: int


def merge_runs(sorted_items: Iterable[int]) -> list[tuple[int, int]]:
    """``(start, count)`` runs of consecutive integers from an ascending, duplicate-free sequence."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    prev: int | None = None
    for item in sorted_items:
        if prev is not None and item == prev + 1:
            prev = item
            continue
        if start is not None and prev is not None:  # set together
            runs.append((start, prev - start + 1))
        start = prev = item
    if start is not None and prev is not None:
        runs.append((start, prev - start + 1))
    return runs


class PageBitmap:
    """One bit per 4 KiB page of the host mapping of guest RAM: set while the page is in the balloon.

    The bits live in an anonymous mapping, so a bitmap for 512 GiB of RAM (16 MiB) only costs
    memory where pages were actually ballooned. Used by the I/O thread with the device lock held.
    """

    def __init__(self, pages: int):
        self.pages = pages
        self.count = 0  # bits set
        self._bits = mmap.mmap(-1, max((pages + 7) // 8, 1))

    def test(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def set(self, index: int) -> bool:
        """Set the bit; False if it was already set."""
        byte, mask = index >> 3, 1 << (index & 7)
        old = self._bits[byte]
        if old & mask:
            return False
        self._bits[byte] = old | mask
        self.count += 1
        return True

    def clear(self, index: int) -> bool:
        """Clear the bit; False if it was already clear."""
        byte, mask = index >> 3, 1 << (index & 7)
        old = self._bits[byte]
        if not old & mask:
            return False
        self._bits[byte] = old & ~mask
        self.count -= 1
        return True

    def all_set(self, start: int, count: int) -> bool:
        return start + count <= self.pages and all(self.test(i) for i in range(start, start + count))

    def chunks(self) -> tuple[tuple[int, bytes], ...]:
        """The bitmap as (byte offset, bytes) pieces that have bits set; all-zero stretches of
        CHUNK bytes are left out, so a mostly empty bitmap is small."""
        out = []
        zero = bytes(BITMAP_CHUNK)
        size = len(self._bits)
        for off in range(0, size, BITMAP_CHUNK):
            piece = self._bits[off:off + BITMAP_CHUNK]
            if piece != zero[:len(piece)]:
                out.append((off, piece))
        return tuple(out)

    def load_chunks(self, chunks: Iterable[tuple[int, bytes]]) -> None:
        """Set the bits of :meth:`chunks`' pieces on an empty bitmap (ValueError if a piece lies
        outside it or sets a bit past the last page)."""
        size = len(self._bits)
        pieces = list(chunks)
        for off, piece in pieces:
            if off < 0 or off + len(piece) > size:
                raise ValueError(f"ballooned-page bitmap piece [{off}, +{len(piece)}) is outside "
                                 f"the {size}-byte bitmap")
        for off, piece in pieces:
            self._bits[off:off + len(piece)] = piece
        everything = int.from_bytes(self._bits[:], "little")
        if everything >> self.pages:
            raise ValueError(f"ballooned-page bitmap has bits set past the last of {self.pages} pages")
        self.count = everything.bit_count()

    def close(self) -> None:
        self._bits.close()


@dataclass(frozen=True)
class BalloonState:
    """The balloon as a value (for snapshots): the virtio base state (``num_pages`` and
    ``actual`` are its config bytes), the ballooned-page bitmap as :meth:`PageBitmap.chunks`
    pieces, the statistics polling interval and the statistics the driver last posted. A
    statistics buffer the device holds is given back to its ring (the driver's copy of it is
    in guest memory); after restore the device takes it again and asks for fresh values on the
    next poll."""

    virtio: VirtioState
    ballooned: tuple[tuple[int, bytes], ...]
    stats_interval: int
    stats: BalloonStats | None


class VirtioBalloon(VirtioDevice):
    """A virtio-balloon in front of ``ram_size`` bytes of guest RAM.

    ``deflate_on_oom`` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM (only a feature bit: the guest
    deflates from its OOM notifier and the device just sees deflate requests). ``stats`` offers
    VIRTIO_BALLOON_F_STATS_VQ and a third queue. ``on_actual_changed(actual_bytes)`` is called
    when the driver changes ``actual``, coalesced per ``report_interval`` seconds when one is
    given (see the module docstring for its thread).
    ``host_page_size`` defaults to ``mmap.PAGESIZE``; tests pass a larger power of two to
    exercise the sub-page rule on a 4 KiB host.
    """

    device_id = VIRTIO_ID_BALLOON

    def __init__(self, ram_size: int, *, deflate_on_oom: bool = False, stats: bool = True,
                 on_actual_changed: Callable[[int], None] | None = None, name: str = "balloon",
                 host_page_size: int | None = None, report_interval: float | None = None):
        super().__init__(name)
        if ram_size <= 0:
            raise ValueError(f"balloon RAM size {ram_size} must be positive")
        page = mmap.PAGESIZE if host_page_size is None else host_page_size
        if page < BALLOON_PAGE_SIZE or page & (page - 1):
            raise ValueError(f"host page size {page} is not a power of two of at least {BALLOON_PAGE_SIZE}")
        self.ram_size = ram_size
        self.ram_pages = ram_size >> VIRTIO_BALLOON_PFN_SHIFT
        self.deflate_on_oom = deflate_on_oom
        self.stats_offered = stats
        self.on_actual_changed = on_actual_changed
        self.report_interval = report_interval
        self._report_timer: Timer | None = None
        self._reported: int | None = None     # the last value on_actual_changed was given
        self._stats_interval = 0               # seconds; 0: the guest's statistics are not polled
        self._stats_timer: Timer | None = None
        self.host_page_size = page
        self._subpages = page // BALLOON_PAGE_SIZE
        # An instance attribute: the transport reads it once, and the stats queue only exists
        # when it is offered.
        self.queue_max_sizes = (QUEUE_SIZE,) * (3 if stats else 2)
        self._config = bytearray(CONFIG.size)
        self._spans: list[_RamSpan] = []
        self._bitmap: PageBitmap | None = None
        self._stats_head: int | None = None
        self._stats: BalloonStats | None = None
        self._logged: set[str] = set()

    # -- features and config ---------------------------------------------------------------------
    def device_features(self) -> int:
        features = super().device_features()
        if self.stats_offered:
            features |= bit(VIRTIO_BALLOON_F_STATS_VQ)
        if self.deflate_on_oom:
            features |= bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        return features

    @property
    def num_pages(self) -> int:
        """The host's request: pages the driver should have in the balloon."""
        with self._config_lock:
            return int.from_bytes(self._config[CONFIG_NUM_PAGES:CONFIG_NUM_PAGES + 4], "little")

    @property
    def actual_pages(self) -> int:
        """Pages in the balloon as the driver last reported them (config ``actual``)."""
        with self._config_lock:
            return int.from_bytes(self._config[CONFIG_ACTUAL:CONFIG_ACTUAL + 4], "little")

    def target_bytes(self) -> int:
        """The guest memory size the host asked for: ``ram_bytes - (num_pages << 12)``."""
        return self.ram_size - (self.num_pages << VIRTIO_BALLOON_PFN_SHIFT)

    def actual_bytes(self) -> int:
        """The guest's memory size as the driver reports it: ``ram_bytes - (actual << 12)``
        (what query-balloon answers). A driver claiming more pages than RAM reports 0."""
        return self.ram_size - (min(self.actual_pages, self.ram_pages) << VIRTIO_BALLOON_PFN_SHIFT)

    def set_target(self, value: int) -> int:
        """Ask the guest to shrink (or grow back) to ``value`` bytes; returns the new num_pages.

        Any thread. Works whether or not the driver is active (an inactive driver reads the
        target when it starts); the config-change interrupt is only raised for an active one.
        Refusing the request for an inactive device is the caller's policy.
        """
        if value < 0:
            raise ValueError(f"balloon target {value} is negative")
        num_pages = self.ram_pages - min(value >> VIRTIO_BALLOON_PFN_SHIFT, self.ram_pages)
        # Always a config change, even for an unchanged value: the driver re-reads and
        # re-evaluates, which is harmless, and a guest that missed an interrupt gets another.
        self._update_config(CONFIG_NUM_PAGES, num_pages.to_bytes(4, "little"))
        log.info("%s: target %d bytes -> num_pages %d", self.name, value, num_pages)
        return num_pages

    def write_config(self, offset: int, size: int, value: int) -> None:
        """The driver writes ``actual``; bytes landing on ``num_pages`` (the host's field) are
        ignored. vCPU thread."""
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        with self._config_lock:
            old = self._config[CONFIG_ACTUAL:CONFIG_ACTUAL + 4]
            new = bytearray(old)
            for i, byte in enumerate(data):
                pos = offset + i - CONFIG_ACTUAL
                if 0 <= pos < 4:
                    new[pos] = byte
            # No generation bump and no config interrupt: the driver made this change itself
            # (a config interrupt would only make Linux re-check its target for nothing).
            self._config[CONFIG_ACTUAL:CONFIG_ACTUAL + 4] = new
        if new != old:
            self._actual_changed()

    def _actual_changed(self) -> None:
        if self.on_actual_changed is None:
            return
        io = self.io
        if self.report_interval is None or io is None:
            self._report(self.actual_bytes())
        else:
            io.call_soon_threadsafe(self._moved)

    def _moved(self) -> None:
        """I/O thread: a change reports at once unless a report is being held back."""
        if self._report_timer is None:
            self._report_moved()

    def _report(self, actual: int) -> None:
        callback = self.on_actual_changed
        if callback is None:
            return
        try:
            callback(actual)
        except Exception:  # the machine's bug must not kill a vCPU or I/O thread
            log.exception("%s: on_actual_changed callback failed", self.name)

    def _report_moved(self) -> None:
        """I/O thread: report the size if it moved, then hold further reports for an interval."""
        self._report_timer = None
        actual = self.actual_bytes()
        if actual == self._reported:
            return
        self._reported = actual
        self._report(actual)
        assert self.io is not None and self.report_interval is not None
        self._report_timer = self.io.call_later(self.report_interval, self._report_moved)

    # -- lifecycle (lock held) -------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: Sequence[SplitQueue | None], interrupt: Interrupt,
                 features: int) -> None:
        super().activate(mem, queues, interrupt, features)
        spans = []
        for region in mem.regions:
            first = -(-region.gpa // BALLOON_PAGE_SIZE)          # whole 4 KiB pages only
            end = (region.gpa + region.size) // BALLOON_PAGE_SIZE
            index = (region.offset + first * BALLOON_PAGE_SIZE - region.gpa) // BALLOON_PAGE_SIZE
            if end > first:
                spans.append(_RamSpan(first, end, index, region.gpa, region.offset, region.size))
        self._spans = spans
        if self._bitmap is not None:
            self._bitmap.close()
        self._bitmap = PageBitmap(mem.size // BALLOON_PAGE_SIZE)
        self._stats_head = None

    def reset(self) -> None:
        """The driver reset the device (a reboot, or the driver unloading): nothing is in the
        balloon any more -- a new driver starts from an empty one -- so ``actual`` drops to 0.
        ``num_pages`` stays: it is the host's standing request. Pages released earlier stay
        released until the guest touches them. The last statistics stay readable."""
        super().reset()
        if self._bitmap is not None:
            self._bitmap.close()
            self._bitmap = None
        self._stats_head = None
        with self._config_lock:
            changed = any(self._config[CONFIG_ACTUAL:CONFIG_ACTUAL + 4])
            self._config[CONFIG_ACTUAL:CONFIG_ACTUAL + 4] = bytes(4)
        if changed:
            self._actual_changed()

    def close(self) -> None:
        with self.lock:
            if self._bitmap is not None:
                self._bitmap.close()
                self._bitmap = None

    # -- state as a value (lock held) -------------------------------------------------------------
    def unfinished_chains(self, index: int) -> int:
        # The statistics buffer the device holds is always the last chain it popped there.
        return 1 if index == STATS_QUEUE and self._stats_head is not None else 0

    def save_state(self) -> BalloonState:
        """The balloon's state (lock held, device quiet)."""
        bitmap = self._bitmap
        return BalloonState(self.save_virtio_state(), bitmap.chunks() if bitmap is not None else (),
                            self._stats_interval, self._stats)

    def restore_state(self, state: object, mem: GuestMemory, interrupt: Interrupt) -> None:
        """Take back a saved state (lock held, inactive and quiet, I/O thread not started)."""
        if not isinstance(state, BalloonState):
            raise ValueError(f"{self.name} is a balloon; the saved state is a {type(state).__name__}")
        if not 0 <= state.stats_interval <= 0xFFFF_FFFF:
            raise ValueError(f"{self.name}: statistics interval {state.stats_interval} out of range")
        self.restore_virtio_state(state.virtio, mem, interrupt)
        if state.ballooned:
            if self._bitmap is None:
                raise ValueError(f"{self.name}: ballooned pages recorded for an inactive balloon")
            self._bitmap.load_chunks(state.ballooned)
        self._stats = state.stats
        self._reported = self.actual_bytes()  # the guest's size is not news after a restore
        if state.stats_interval:
            self.set_stats_interval(state.stats_interval)

    # -- queues (I/O thread, lock held) ----------------------------------------------------------
    def process_queue(self, index: int) -> bool:
        queue = self.queue(index)
        if queue is None:
            return False
        if index == STATS_QUEUE:
            if self.negotiated(VIRTIO_BALLOON_F_STATS_VQ):
                self._process_stats(queue)
            return False
        if index not in (INFLATE_QUEUE, DEFLATE_QUEUE):
            return False
        inflate = index == INFLATE_QUEUE
        what = "inflate" if inflate else "deflate"

        def handle(chain: DescChain) -> int:
            pfns = self._read_pfns(chain, what)
            if pfns:
                if inflate:
                    self._inflate(pfns)
                else:
                    self._deflate(pfns)
            return 0  # used length 0: the device wrote nothing into device-readable buffers

        return self.serve_batch(queue, handle, BATCH)

    def _read_pfns(self, chain: DescChain, what: str) -> list[int]:
        """The PFNs of one inflate/deflate request, or [] for a malformed one (logged)."""
        if chain.writable:
            self._log_once(f"{what}-writable", f"{what} request {chain.head} has device-writable "
                           "buffers; ignored")
            return []
        length = chain.readable_len
        if length % PFN_SIZE:
            self._log_once(f"{what}-length", f"{what} request {chain.head} is {length} bytes, not a "
                           f"whole number of {PFN_SIZE}-byte PFNs; ignored")
            return []
        if length > MAX_REQUEST_BYTES:
            self._log_once(f"{what}-size", f"{what} request {chain.head} carries {length // PFN_SIZE} "
                           f"PFNs, more than {MAX_REQUEST_BYTES // PFN_SIZE}; ignored")
            return []
        data = read_buffers(self.mem, chain.readable)
        return list(struct.unpack(f"<{length // PFN_SIZE}I", data))

    def _indices(self, pfns: Iterable[int], what: str) -> list[int]:
        """Sorted, deduplicated bitmap indices of the PFNs that are guest RAM; the others are
        logged and dropped."""
        spans = self._spans
        indices = set()
        bad = []
        for pfn in set(pfns):
            for span in spans:
                if span.first_pfn <= pfn < span.end_pfn:
                    indices.add(span.first_index + pfn - span.first_pfn)
                    break
            else:
                bad.append(pfn)
        if bad:
            bad.sort()
            self._log_once(f"{what}-range", f"{what}: {len(bad)} PFN(s) outside guest RAM skipped "
                           f"(first {bad[0]:#x})")
        return sorted(indices)

    def _inflate(self, pfns: list[int]) -> None:
        bitmap = self._bitmap
        assert bitmap is not None  # made by activate; requests come only while active
        added = [i for i in self._indices(pfns, "inflate") if bitmap.set(i)]
        if not added:
            return
        n = self._subpages
        # Host pages touched by this request that are now wholly in the balloon.
        host_pages = sorted({i // n for i in added})
        if n > 1:
            host_pages = [h for h in host_pages if bitmap.all_set(h * n, n)]
        for host_page, count in merge_runs(host_pages):
            self._release(host_page * self.host_page_size, count * self.host_page_size)

    def _release(self, offset: int, length: int) -> None:
        """MADV_DONTNEED the host mapping range [offset, +length), one discard per RAM region."""
        end = offset + length
        for span in self._spans:
            lo = max(offset, span.offset)
            hi = min(end, span.offset + span.size)
            if lo >= hi:
                continue
            gpa = span.gpa + (lo - span.offset)
            try:
                self.mem.discard(gpa, hi - lo)
            except (OSError, ValueError, GuestMemoryError) as exc:
                # The pages stay recorded as ballooned: the guest gave them up either way, we
                # just could not hand the memory back to the host (e.g. huge pages).
                self._log_once("madvise", f"releasing guest range [{gpa:#x}, +{hi - lo:#x}) "
                               f"failed: {exc}")

    def _deflate(self, pfns: list[int]) -> None:
        bitmap = self._bitmap
        assert bitmap is not None  # made by activate; requests come only while active
        for i in self._indices(pfns, "deflate"):
            bitmap.clear(i)  # a page that was not in the balloon is harmless

    def ballooned_pages(self) -> int:
        """How many 4 KiB pages the device holds as ballooned (from the requests, not ``actual``)."""
        with self.lock:
            return self._bitmap.count if self._bitmap is not None else 0

    # -- statistics ------------------------------------------------------------------------------
    def _process_stats(self, queue: SplitQueue) -> None:
        returned = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            if not self._parse_stats(chain):
                queue.add_used(chain.head, 0)  # returned unread; a buffer already held stays
                returned = True
                continue
            if self._stats_head is not None:
                # The driver must keep at most one buffer here (spec §5.5.6.3); give the older
                # one back so it cannot leak.
                queue.add_used(self._stats_head, 0)
                returned = True
            self._stats_head = chain.head
        if returned:
            self.notify_used(queue)

    def _parse_stats(self, chain: DescChain) -> bool:
        if chain.writable:
            self._log_once("stats-writable", f"statistics buffer {chain.head} has device-writable "
                           "buffers; returned unread")
            return False
        length = chain.readable_len
        if length > MAX_STATS_BYTES:
            self._log_once("stats-size", f"statistics buffer {chain.head} is {length} bytes, more "
                           f"than {MAX_STATS_BYTES}; returned unread")
            return False
        if length % STAT.size:
            self._log_once("stats-length", f"statistics buffer {chain.head} is {length} bytes, not "
                           f"a whole number of {STAT.size}-byte entries; the partial entry is ignored")
        data = read_buffers(self.mem, chain.readable)
        values: dict[str, int] = {}
        for off in range(0, length - length % STAT.size, STAT.size):
            tag, value = STAT.unpack_from(data, off)
            name = STAT_NAMES.get(tag)
            if name is not None:  # unknown tags are ignored (spec §5.5.6.3)
                values[name] = value
        self._stats = BalloonStats(values, time.time())
        return True

    def latest_stats(self) -> BalloonStats | None:
        """The statistics the driver last posted, or None if it never did. Any thread."""
        return self._stats

    def request_stats(self) -> bool:
        """Ask the driver for fresh statistics by returning the buffer it posted; True if a
        buffer was returned. Control thread (takes the device lock, so it waits for a request
        in flight). The new values arrive asynchronously; poll :meth:`latest_stats`."""
        with self.lock:
            head = self._stats_head
            queue = self.queue(STATS_QUEUE)
            if head is None or queue is None:
                return False
            self._stats_head = None
            queue.add_used(head, 0)
            self.notify_used(queue)
            return True

    @property
    def stats_interval(self) -> int:
        """Seconds between requests for fresh statistics; 0 when the guest is not polled."""
        return self._stats_interval

    def set_stats_interval(self, seconds: int) -> None:
        """Poll the driver for statistics every ``seconds`` (0 stops). Any thread; the timer runs
        on the I/O thread, and a guest that has not posted a buffer yet (or is paused) is simply
        asked again next time."""
        if seconds < 0:
            raise ValueError(f"statistics interval {seconds} is negative")
        self._stats_interval = seconds
        io = self.io
        if io is not None:
            io.call_soon_threadsafe(self._rearm_stats)

    def _rearm_stats(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        if self._stats_interval and self.io is not None:
            self._stats_timer = self.io.call_later(self._stats_interval, self._poll_stats)

    def _poll_stats(self) -> None:
        self._stats_timer = None
        self.request_stats()
        self._rearm_stats()

    # -- logging ---------------------------------------------------------------------------------
    def _log_once(self, key: str, message: str) -> None:
        """A guest can repeat a bad request forever; warn once per kind, then at debug level."""
        if key in self._logged:
            log.debug("%s: %s", self.name, message)
        else:
            self._logged.add(key)
            log.warning("%s: %s (further occurrences at debug level)", self.name, message)
