"""virtio-blk (device id 2, spec §5.2) on a host file or block device, with StratoVirt's
hot-replace model.

Owns: the block request protocol (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; anything else
is UNSUPP) and the config space (capacity, seg_max, blk_size, discard/write-zeroes limits). The
host side of a drive (:class:`~.block_backend.FileBackend`) is :mod:`.block_backend`'s.

Hot-replace: the machine creates a fixed set of block slots; an empty slot is a disk of
capacity 0. :meth:`VirtioBlk.set_backend` swaps the backend under the device lock (a request in
flight finishes on the old backend), flushes and closes the old one, updates the capacity, bumps
ConfigGeneration and raises a config-change interrupt when the driver is active; Linux's
virtio_blk then re-reads the capacity and resizes the disk.

Read-only, and why a hot-plugged read-only disk still refuses writes: feature bits are
negotiated once, at driver initialisation, so VIRTIO_BLK_F_RO reflects how the *slot* was
created (a boot drive with ``readonly=on``). A read-only backend hot-plugged into a slot whose
driver negotiated read-write looks writable to the guest, so the device refuses each write
(OUT, DISCARD, WRITE_ZEROES) with VIRTIO_BLK_S_IOERR and writes nothing. When the device offered
VIRTIO_BLK_F_RO, writes fail the same way whatever the backend (spec §5.2.6.2: the device MUST
fail writes if RO is offered).

Host I/O errors become VIRTIO_BLK_S_IOERR for that request, and management hears of them:
``on_io_error(operation, nospace, reason)`` (QMP's BLOCK_IO_ERROR) is called on the I/O thread for
the first error at once, then at most once per :data:`IO_ERROR_REPORT_INTERVAL` while errors go on
(one more call at the end of a window in which errors were held back), so a guest hammering a
broken disk cannot flood the management socket. No exception reaches the transport except
QueueError for a request that cannot be framed at all (no header or no status byte).
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from time import monotonic

from ..memory.guest import GuestMemory
from ..util.eventloop import Timer
from .block_backend import SECTOR_SHIFT, SECTOR_SIZE, FileBackend
from .device import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, Interrupt, VirtioDevice, VirtioState, bit
from .queue import Buffers, DescChain, QueueError, SplitQueue, read_buffers, split_buffers, write_buffers

log = logging.getLogger(__name__)

IO_ERROR_REPORT_INTERVAL = 1.0  # seconds between BLOCK_IO_ERROR reports while errors go on

VIRTIO_ID_BLOCK = 2
QUEUE_SIZE = 256
# Without indirect descriptors a request is header + data segments + status in one ring; with
# queue size 256 that leaves 254 data segments (and Linux sizes its requests by this value).
SEG_MAX = QUEUE_SIZE - 2
BLK_SIZE = 512
ID_BYTES = 20
REQUEST_HEADER = 16
# Chains handled per process_queue call before the used interrupt and a chance for a backend
# swap or reset waiting on the device lock.
BATCH = 32
# Within a batch, completed requests are published (and the driver interrupted if it asked to
# be) once the batch has run this long: a batch of page-cache requests finishes sooner and gets
# one interrupt; a batch of disk requests reports what is done every millisecond, so a request's
# latency is not the whole batch's (32 O_DIRECT requests take a few milliseconds) and the driver
# refills the ring meanwhile. Not much more often: an interrupt costs the device's thread up to
# ~50 us on this project's nested host, a sizeable share of a 4 KiB disk request.
PUBLISH_AFTER = 1e-3

# Feature bits (spec §5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status values (spec §5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

# Discard / write-zeroes limits we advertise and enforce.
MAX_DISCARD_SECTORS = 1 << 22          # 2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8           # 4 KiB: the host filesystem's usual hole granularity
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32
SEGMENT = struct.Struct("<QII")        # struct virtio_blk_discard_write_zeroes

# struct virtio_blk_config up to write_zeroes_may_unmap and its padding: 60 bytes.
CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x")
CONFIG_CAPACITY = 0

_REQ_HEADER = struct.Struct("<IIQ")

# -- one request -----------------------------------------------------------------------------------
class BlkRequest:
    """One virtio-blk request, parsed from its descriptor chain (spec §5.2.6): the header's type
    and sector, the data buffers (device-readable for OUT/DISCARD/WRITE_ZEROES, device-writable
    for IN/GET_ID) and the guest address of the status byte.

    :meth:`parse` only frames the request (it raises QueueError for a chain that has no header or
    no status byte: a driver bug the transport answers with DEVICE_NEEDS_RESET); every judgement
    about its content (type, range, alignment, segments) is :meth:`execute`'s, which answers with
    a status. So both can be exercised, and fuzzed, without a queue or a device.

    A plain class with slots rather than a frozen dataclass: one is built per request, and a
    frozen dataclass's ``__init__`` costs several times as much.
    """

    __slots__ = ("head", "type", "sector", "data_out", "data_in", "status")

    def __init__(self, head: int, type: int, sector: int, data_out: Buffers, data_in: Buffers,
                 status: int):
        self.head, self.type, self.sector = head, type, sector
        self.data_out, self.data_in, self.status = data_out, data_in, status

    def __repr__(self) -> str:
        return (f"BlkRequest(head={self.head}, type={self.type}, sector={self.sector}, "
                f"data_out={self.data_out}, data_in={self.data_in}, status={self.status:#x})")

    @classmethod
    def parse(cls, chain: DescChain, mem: GuestMemory) -> BlkRequest:
        head, readable, writable = chain
        if readable and readable[0][1] == REQUEST_HEADER and writable and writable[-1][1] == 1:
            # The usual layout (Linux's): the header alone in the first buffer, the status byte
            # alone in the last.
            rtype, _reserved, sector = _REQ_HEADER.unpack(mem.read(readable[0][0], REQUEST_HEADER))
            return cls(head, rtype, sector, readable[1:], writable[:-1], writable[-1][0])
        if chain.readable_len < REQUEST_HEADER:
            raise QueueError(f"virtio-blk request {head} has a {chain.readable_len}-byte header "
                             f"(needs {REQUEST_HEADER})")
        writable_len = chain.writable_len
        if writable_len < 1:
            raise QueueError(f"virtio-blk request {head} has no status byte")
        rtype, _reserved, sector = _REQ_HEADER.unpack(read_buffers(mem, readable, REQUEST_HEADER))
        _, data_out = split_buffers(readable, REQUEST_HEADER)
        data_in, status_buf = split_buffers(writable, writable_len - 1)
        return cls(head, rtype, sector, data_out, data_in, status_buf[0][0])

    def execute(self, mem: GuestMemory, backend: FileBackend | None, *, writes_refused: bool,
                serial: str | None, discard: bool, write_zeroes: bool) -> tuple[int, int]:
        """Carry the request out against ``backend`` (None: an empty slot) and return
        (status, bytes written into the device-writable buffers). ``writes_refused``: the disk is
        read-only; ``discard``/``write_zeroes``: the driver negotiated those features. Host I/O
        errors are raised as OSError for the caller to log and answer with IOERR."""
        capacity = backend.capacity if backend is not None else 0
        rtype, sector = self.type, self.sector
        if rtype == VIRTIO_BLK_T_IN:
            bufs = self.data_in
            n = bufs[0][1] if len(bufs) == 1 else _total(bufs)
            if n % SECTOR_SIZE or sector + (n >> SECTOR_SHIFT) > capacity:
                return VIRTIO_BLK_S_IOERR, 0
            if n:
                assert backend is not None
                backend.readv(sector << SECTOR_SHIFT, [mem.view(addr, length) for addr, length in bufs])
            return VIRTIO_BLK_S_OK, n
        if rtype == VIRTIO_BLK_T_OUT:
            bufs = self.data_out
            n = bufs[0][1] if len(bufs) == 1 else _total(bufs)
            if writes_refused or n % SECTOR_SIZE or sector + (n >> SECTOR_SHIFT) > capacity:
                return VIRTIO_BLK_S_IOERR, 0
            if n:
                assert backend is not None
                backend.writev(sector << SECTOR_SHIFT, [mem.view(addr, length) for addr, length in bufs])
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            if backend is not None:
                backend.flush()
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            ident = (serial or "").encode("ascii", "replace")[:ID_BYTES].ljust(ID_BYTES, b"\0")
            return VIRTIO_BLK_S_OK, write_buffers(mem, self.data_in, ident)
        if rtype == VIRTIO_BLK_T_DISCARD:
            return self._discard_or_zero(mem, backend, capacity, writes_refused, discard, True), 0
        if rtype == VIRTIO_BLK_T_WRITE_ZEROES:
            return self._discard_or_zero(mem, backend, capacity, writes_refused, write_zeroes, False), 0
        return VIRTIO_BLK_S_UNSUPP, 0

    def _discard_or_zero(self, mem: GuestMemory, backend: FileBackend | None, capacity: int,
                         writes_refused: bool, negotiated: bool, discard: bool) -> int:
        if not negotiated:
            return VIRTIO_BLK_S_UNSUPP
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        size = _total(self.data_out)
        if size == 0 or size % SEGMENT.size or size // SEGMENT.size > max_seg:
            return VIRTIO_BLK_S_IOERR
        data = read_buffers(mem, self.data_out)
        segments = [SEGMENT.unpack_from(data, off) for off in range(0, size, SEGMENT.size)]
        # Flags first: unknown flags (and UNMAP on a discard) are UNSUPP whatever else is wrong.
        for _sector, _num, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP
        if writes_refused:
            return VIRTIO_BLK_S_IOERR
        for sector, num, _flags in segments:
            if num > max_sectors or not _range_ok(capacity, sector, num << SECTOR_SHIFT):
                return VIRTIO_BLK_S_IOERR
        for sector, num, flags in segments:
            if not num:
                continue
            assert backend is not None  # a non-empty range on an empty slot failed _range_ok
            if discard:
                backend.discard(sector << SECTOR_SHIFT, num << SECTOR_SHIFT)
            else:
                backend.write_zeroes(sector << SECTOR_SHIFT, num << SECTOR_SHIFT,
                                     bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return VIRTIO_BLK_S_OK


def _total(bufs: Buffers) -> int:
    return sum(length for _, length in bufs)


def _range_ok(capacity: int, sector: int, nbytes: int) -> bool:
    """Whole sectors (spec §5.2.6) inside the disk. ``capacity`` is the backend's own, not the
    config field's: during a hot-replace the backend changes first, and a request sized for the
    old disk must not run off (or, on a write, extend) the new one. (IN and OUT inline the same
    test: they are the hot path.)"""
    return nbytes % SECTOR_SIZE == 0 and sector + (nbytes >> SECTOR_SHIFT) <= capacity


# -- the device ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlkState:
    """A virtio-blk device as a value (for snapshots): the virtio base state (the capacity is in
    its config bytes), the serial number GET_ID reports, and whether VIRTIO_BLK_F_RO is offered.
    The backend is not part of it: the machine reopens the drive and checks its size."""

    virtio: VirtioState
    serial: str | None
    read_only: bool


class VirtioBlk(VirtioDevice):
    """A virtio-blk device (one request queue of 256) over an optional :class:`FileBackend`.

    ``read_only`` decides whether VIRTIO_BLK_F_RO is offered (default: the backend's mode, or
    read-write for an empty slot so that any disk can be hot-plugged into it later).
    """

    device_id = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, backend: FileBackend | None = None, *, name: str = "blk",
                 read_only: bool | None = None, serial: str | None = None,
                 on_io_error: Callable[[str, bool, str], None] | None = None):
        super().__init__(name)
        self._backend = backend
        self.serial = serial
        self.read_only = backend.read_only if read_only is None and backend is not None else bool(read_only)
        self._io_error_logged = False
        self.on_io_error = on_io_error
        self._error_timer: Timer | None = None
        self._held_error: tuple[str, bool, str] | None = None  # the last error not yet reported
        self._discard = self._write_zeroes = False   # negotiated features, set at activation
        self._config = bytearray(CONFIG.pack(
            backend.capacity if backend is not None else 0,
            0,                           # size_max (VIRTIO_BLK_F_SIZE_MAX not offered)
            SEG_MAX,
            0, 0, 0,                     # geometry (not offered)
            BLK_SIZE,
            0, 0, 0, 0,                  # topology (not offered)
            0, 0,                        # writeback (CONFIG_WCE not offered), unused0
            1,                           # num_queues (VIRTIO_BLK_F_MQ not offered)
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
            1,                           # write_zeroes_may_unmap: UNMAP punches a hole
        ))

    # -- features and config ---------------------------------------------------------------------
    def device_features(self) -> int:
        features = (super().device_features() | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)
                    | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH)
                    | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES))
        if self.read_only:
            features |= bit(VIRTIO_BLK_F_RO)
        return features

    @property
    def backend(self) -> FileBackend | None:
        return self._backend

    @property
    def capacity(self) -> int:
        return int.from_bytes(self._config[CONFIG_CAPACITY:CONFIG_CAPACITY + 8], "little")

    # -- hot-replace -----------------------------------------------------------------------------
    def set_backend(self, backend: FileBackend | None, serial: str | None = None) -> Future[None]:
        """Replace the drive (None empties the slot) and the serial number GET_ID reports; see
        the module docstring. Any thread: the swap, and the old image's flush and close, run on
        the I/O thread after the request in flight; the future says when it is done."""
        return self.on_io_thread(lambda: self._swap(backend, serial))

    def _swap(self, backend: FileBackend | None, serial: str | None) -> None:
        capacity = backend.capacity if backend is not None else 0
        with self.lock:
            old, self._backend = self._backend, backend
            self.serial = serial if backend is not None else None
            self._io_error_logged = False
            # Under the device lock, so a driver reset cannot slip between "active" and the
            # config interrupt (a reset device must show no pending interrupt).
            self._update_config(CONFIG_CAPACITY, capacity.to_bytes(8, "little"))
        if old is not None and old is not backend:
            self._flush(old)
            old.close()
        log.info("%s: backend %s, %d sectors", self.name, backend.path if backend else "none", capacity)

    def _flush(self, backend: FileBackend) -> None:
        try:
            backend.flush()
        except OSError as exc:
            log.warning("%s: flushing %s failed: %s", self.name, backend.path, exc.strerror)

    def flush(self) -> None:
        """Flush the backend to stable storage (e.g. on quit); errors are logged."""
        with self.lock:
            if self._backend is not None:
                self._flush(self._backend)

    def close(self) -> None:
        """Flush and close the backend; the slot is empty afterwards."""
        self.flush()
        with self.lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    # -- state as a value (lock held) -------------------------------------------------------------
    def save_state(self) -> BlkState:
        """The device's state (lock held, device quiet); requests complete as they are popped,
        so no chain is ever held."""
        return BlkState(self.save_virtio_state(), self.serial, self.read_only)

    def restore_state(self, state: object, mem: GuestMemory, interrupt: Interrupt) -> None:
        """Take back a saved state (lock held, inactive, after the machine attached the drive):
        the attached drive must have the capacity the guest was shown (ValueError otherwise)."""
        if not isinstance(state, BlkState):
            raise ValueError(f"{self.name} is a block device; the saved state is a {type(state).__name__}")
        self.read_only = state.read_only
        self.serial = state.serial
        self.restore_virtio_state(state.virtio, mem, interrupt)
        backend = self._backend
        capacity = backend.capacity if backend is not None else 0
        if capacity != self.capacity:
            what = f"the disk {backend.path} has {capacity}" if backend is not None else "the slot is empty, 0"
            raise ValueError(f"{self.name}: the guest knows a disk of {self.capacity} sectors, but "
                             f"{what} sectors")

    # -- request processing (I/O thread, lock held) ----------------------------------------------
    def activate(self, mem: GuestMemory, queues: Sequence[SplitQueue | None], interrupt: Interrupt,
                 features: int) -> None:
        super().activate(mem, queues, interrupt, features)
        # Looked up once per activation rather than once per request.
        self._discard = bool(features & bit(VIRTIO_BLK_F_DISCARD))
        self._write_zeroes = bool(features & bit(VIRTIO_BLK_F_WRITE_ZEROES))

    def process_queue(self, index: int) -> bool:
        """Serve up to BATCH requests: the chains are popped together, executed in order, and
        published as used together, with one interrupt decision for the batch.

        The usual request -- IN or OUT laid out as Linux lays it out, the 16-byte header alone in
        the first buffer and the status byte alone in the last -- is carried out right here,
        through the queue's view of guest RAM (its buffers were checked when the chain was
        walked) and with the very checks of :meth:`BlkRequest.execute`: whole sectors inside the
        backend's own capacity, no write to a read-only disk or slot. Anything else, and any
        request on an empty slot, goes through :class:`BlkRequest`. At a few microseconds per
        request, each Python call saved here is a few per cent of the device's throughput.
        """
        queue = self.queue(index)
        if queue is None:
            return False
        chains = queue.pop_batch(BATCH)
        if not chains:
            return False
        view, at = queue.view, queue.host_offset
        backend = self._backend
        if backend is not None:
            capacity = backend.capacity
            writes_refused = self.read_only or backend.read_only
        used: list[tuple[int, int]] = []
        deadline = monotonic() + PUBLISH_AFTER
        try:
            for chain in chains:
                if used and monotonic() > deadline:
                    # Slow requests (a disk, not the page cache): hand over what is done, so the
                    # driver refills the ring while the rest of the batch is still being served.
                    queue.add_used_batch(used)
                    used = []
                    self.notify_used(queue)
                    deadline = monotonic() + PUBLISH_AFTER
                head, readable, writable = chain
                if backend is None or not readable or readable[0][1] != REQUEST_HEADER \
                        or not writable or writable[-1][1] != 1:
                    used.append((head, self._handle(chain)))
                    continue
                rtype, _reserved, sector = _REQ_HEADER.unpack_from(view, at(readable[0][0]))
                if rtype == VIRTIO_BLK_T_IN and len(readable) == 1:
                    bufs = writable[:-1]
                    reading = True
                elif rtype == VIRTIO_BLK_T_OUT and len(writable) == 1:
                    bufs = readable[1:]
                    reading = False
                else:
                    used.append((head, self._handle(chain)))
                    continue
                n = bufs[0][1] if len(bufs) == 1 else _total(bufs)
                if n % SECTOR_SIZE or sector + (n >> SECTOR_SHIFT) > capacity \
                        or (writes_refused and not reading):
                    status, written = VIRTIO_BLK_S_IOERR, 0
                else:
                    status, written = VIRTIO_BLK_S_OK, n if reading else 0
                    if n:
                        views = [view[(o := at(addr)):o + length] for addr, length in bufs]
                        try:
                            if reading:
                                backend.readv(sector << SECTOR_SHIFT, views)
                            else:
                                backend.writev(sector << SECTOR_SHIFT, views)
                        except OSError as exc:
                            self._log_io_error(rtype, sector, exc)
                            status, written = VIRTIO_BLK_S_IOERR, 0
                        del views
                status_addr = writable[-1][0]
                view[at(status_addr)] = status
                used.append((head, written + 1))
        finally:
            queue.add_used_batch(used)   # what completed is completed, even if a later chain was bad
        self.notify_used(queue)
        # pop_batch looked at avail->idx again after it asked for the next notification: a chain
        # the driver added meanwhile was not notified, so it is served now.
        return len(chains) >= BATCH or queue.has_available()

    def _handle(self, chain: DescChain) -> int:
        """Parse and execute one request; returns the bytes written to its writable buffers."""
        mem = self.mem
        request = BlkRequest.parse(chain, mem)
        backend = self._backend
        try:
            status, written = request.execute(
                mem, backend, writes_refused=self.read_only or (backend is not None and backend.read_only),
                serial=self.serial, discard=self._discard, write_zeroes=self._write_zeroes)
        except OSError as exc:
            self._log_io_error(request.type, request.sector, exc)
            status, written = VIRTIO_BLK_S_IOERR, 0
        mem.write_u8(request.status, status)
        return written + 1

    def _log_io_error(self, rtype: int, sector: int, exc: OSError) -> None:
        backend = self._backend
        path = backend.path if backend is not None else "no backend"
        if not self._io_error_logged:
            self._io_error_logged = True
            log.warning("%s: host I/O error on %s (request type %d, sector %d): %s; the guest gets "
                        "VIRTIO_BLK_S_IOERR (further errors logged at debug level)",
                        self.name, path, rtype, sector, exc.strerror or exc)
        else:
            log.debug("%s: host I/O error on %s (type %d, sector %d): %s", self.name, path, rtype,
                      sector, exc.strerror or exc)
        operation = "read" if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) else "write"
        self._report_io_error((operation, exc.errno == errno.ENOSPC, exc.strerror or str(exc)))

    # -- BLOCK_IO_ERROR (I/O thread) -------------------------------------------------------------
    def _report_io_error(self, error: tuple[str, bool, str]) -> None:
        if self.on_io_error is None:
            return
        if self._error_timer is not None:
            self._held_error = error  # reported when the window ends
            return
        self._emit_io_error(error)
        if self.io is not None:
            self._error_timer = self.io.call_later(IO_ERROR_REPORT_INTERVAL, self._error_window_ended)

    def _error_window_ended(self) -> None:
        self._error_timer = None
        held, self._held_error = self._held_error, None
        if held is not None:
            self._report_io_error(held)

    def _emit_io_error(self, error: tuple[str, bool, str]) -> None:
        try:
            self.on_io_error(*error)  # type: ignore[misc]  # _report_io_error checked it is set
        except Exception:  # the machine's bug must not take the disk down
            log.exception("%s: on_io_error callback failed", self.name)
