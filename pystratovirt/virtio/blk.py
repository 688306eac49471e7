"""virtio-blk (device id 2, spec §5.2) on a host file or block device, with StratoVirt's
hot-replace model.

Owns: the block request protocol (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; anything else
is UNSUPP), the config space (capacity, seg_max, blk_size, discard/write-zeroes limits), and
:class:`FileBackend`, the host side of a drive (buffered or O_DIRECT I/O, flush, hole punching).

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

Host I/O errors become VIRTIO_BLK_S_IOERR for that request; no exception reaches the transport
except QueueError for a request that cannot be framed at all (no header or no status byte).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from contextlib import contextmanager
from typing import Iterator, Sequence

from .device import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, bit
from .queue import Buffers, DescChain, QueueError, read_buffers, split_buffers, write_buffers

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
SECTOR_SHIFT = 9
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

# -- host file I/O helpers -------------------------------------------------------------------------
BOUNCE_SIZE = 1 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENODEV)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _io_all(op, fd: int, views: Sequence[memoryview], offset: int) -> None:
    """preadv/pwritev every byte of ``views`` at ``offset``, in IOV_MAX batches, across short
    transfers; a read hitting end of file is an I/O error."""
    pending = [v for v in views if len(v)]
    i = 0
    while i < len(pending):
        n = op(fd, pending[i:i + IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "unexpected end of file")
        offset += n
        while n:
            length = len(pending[i])
            if n >= length:
                n -= length
                i += 1
            else:
                pending[i] = pending[i][n:]
                n = 0


def _copy(views: Sequence[memoryview], start: int, buf: memoryview, into_views: bool) -> None:
    """Copy between ``buf`` and the concatenation of ``views`` from byte ``start`` of the
    latter: into the views when ``into_views``, out of them otherwise."""
    pos = 0
    done = 0
    for v in views:
        end = pos + len(v)
        if end > start and done < len(buf):
            lo = max(start - pos, 0)
            n = min(len(v) - lo, len(buf) - done)
            if into_views:
                v[lo:lo + n] = buf[done:done + n]
            else:
                buf[done:done + n] = v[lo:lo + n]
            done += n
        pos = end


def _copy_out(src: memoryview, views: Sequence[memoryview], start: int) -> None:
    """Copy ``src`` into the concatenation of ``views`` beginning at byte ``start``."""
    _copy(views, start, src, into_views=True)


def _copy_in(views: Sequence[memoryview], start: int, dst: memoryview) -> None:
    """Fill ``dst`` from the concatenation of ``views`` beginning at byte ``start``."""
    _copy(views, start, dst, into_views=False)


def _address(view: memoryview) -> int | None:
    """Host address of a writable buffer, None for a read-only one."""
    try:
        anchor = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return None
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class BackendError(Exception):
    """A drive file cannot be used; the message is one sentence for the user."""


class FileBackend:
    """A drive: an open host file or block device.

    Takes ownership of ``fd``. ``direct`` means the fd was opened with O_DIRECT: transfers whose
    file offset and length are multiples of ``align`` go straight between guest memory and the
    disk when the guest buffers are aligned too, else through a page-aligned anonymous mmap
    bounce buffer; requests not aligned to ``align`` in the file (possible when the host needs
    4 KiB alignment and the guest writes 512-byte sectors) clear O_DIRECT on the fd for that one
    transfer, which Linux keeps coherent with the direct transfers around it.

    Used by one I/O thread at a time (the device lock serialises it); not thread-safe itself.
    """

    def __init__(self, fd: int, *, path: str | None = None, read_only: bool = False,
                 direct: bool = False, serial: str | None = None, size: int | None = None,
                 align: int = SECTOR_SIZE):
        self.fd = fd
        self.path = path if path is not None else f"fd {fd}"
        self.read_only = read_only
        self.direct = direct
        self.serial = serial
        self.size = size if size is not None else _fd_size(fd)
        self.align = align
        self._bounce = mmap.mmap(-1, BOUNCE_SIZE) if direct else None

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors (a trailing partial sector is not addressable)."""
        return self.size >> SECTOR_SHIFT

    @classmethod
    def open(cls, path: str, read_only: bool = False, direct: bool = False, *,
             serial: str | None = None) -> "FileBackend":
        """Open a drive file; raises BackendError with a one-sentence reason."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BackendError(f"Drive file '{path}' does not exist.") from None
        except PermissionError:
            raise BackendError(f"Permission denied looking up drive file '{path}'.") from None
        except OSError as exc:
            raise BackendError(f"Cannot access drive file '{path}': {exc.strerror}.") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise BackendError(f"Drive file '{path}' is not a regular file or block device.")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise BackendError(_open_error(path, exc, read_only, direct)) from None
        try:
            st = os.fstat(fd)  # what we opened, not what we looked at (the path may have changed)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise BackendError(f"Drive file '{path}' is not a regular file or block device.")
            align = _probe_direct_alignment(fd, path) if direct else SECTOR_SIZE
            return cls(fd, path=path, read_only=read_only, direct=direct, serial=serial, align=align)
        except BaseException:
            os.close(fd)
            raise

    # -- data transfer ---------------------------------------------------------------------------
    def readv(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` from the file at ``offset``; raises OSError."""
        self._transfer(os.preadv, offset, views, reading=True)

    def writev(self, offset: int, views: Sequence[memoryview]) -> None:
        """Write ``views`` to the file at ``offset``; raises OSError."""
        if self.read_only:
            raise OSError(errno.EROFS, "read-only drive")
        self._transfer(os.pwritev, offset, views, reading=False)

    def _transfer(self, op, offset: int, views: Sequence[memoryview], reading: bool) -> None:
        views = [v for v in views if len(v)]
        total = sum(len(v) for v in views)
        if not total:
            return
        if not self.direct:
            _io_all(op, self.fd, views, offset)
            return
        a = self.align
        if offset % a or total % a:
            with self._without_o_direct():
                _io_all(op, self.fd, views, offset)
            return
        if all(len(v) % a == 0 and (addr := _address(v)) is not None and addr % a == 0 for v in views):
            _io_all(op, self.fd, views, offset)  # zero-copy: guest pages satisfy O_DIRECT
            return
        with memoryview(self._bounce) as bounce:
            pos = 0
            while pos < total:
                chunk = bounce[:min(BOUNCE_SIZE, total - pos)]
                if reading:
                    _io_all(op, self.fd, [chunk], offset + pos)
                    _copy_out(chunk, views, pos)
                else:
                    _copy_in(views, pos, chunk)
                    _io_all(op, self.fd, [chunk], offset + pos)
                pos += len(chunk)
                chunk.release()

    @contextmanager
    def _without_o_direct(self) -> Iterator[None]:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        try:
            yield
        finally:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)

    def flush(self) -> None:
        # fdatasync: the data and the metadata needed to read it back (block allocation) reach
        # stable storage; timestamps do not matter to the guest.
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range if the host can; a host without hole punching ignores it (discard
        is advisory: spec §5.2.6.2, the device MAY deallocate)."""
        if self.read_only:
            raise OSError(errno.EROFS, "read-only drive")
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read back as zeroes: punch a hole if allowed, else zero it in place
        (ZERO_RANGE), else write zero bytes."""
        if self.read_only:
            raise OSError(errno.EROFS, "read-only drive")
        modes = ([FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []) + \
                [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        for mode in modes:
            try:
                _fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        zeros = mmap.mmap(-1, min(length, BOUNCE_SIZE))  # anonymous pages are zero and aligned
        try:
            with memoryview(zeros) as zv:
                pos = 0
                while pos < length:
                    n = min(len(zv), length - pos)
                    with zv[:n] as chunk:
                        self.writev(offset + pos, [chunk])
                    pos += n
        finally:
            zeros.close()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:
                log.warning("closing drive file %s failed: %s", self.path, exc.strerror)
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"FileBackend({self.path!r}, {mode}, direct={self.direct}, {self.size} bytes)"


def _fd_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)  # block device (or whatever a caller handed us)


def _open_error(path: str, exc: OSError, read_only: bool, direct: bool) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        how = "reading" if read_only else "reading and writing"
        return f"Permission denied opening drive file '{path}' for {how}."
    if exc.errno == errno.EROFS:
        return f"Drive file '{path}' is on a read-only filesystem; open it read-only."
    if exc.errno == errno.EINVAL and direct:
        return f"The filesystem holding drive file '{path}' does not support O_DIRECT; use direct=off."
    if exc.errno == errno.EISDIR:
        return f"Drive file '{path}' is not a regular file or block device."
    return f"Cannot open drive file '{path}': {exc.strerror}."


def _probe_direct_alignment(fd: int, path: str) -> int:
    """The O_DIRECT alignment this file needs: 512 where the disk has 512-byte logical sectors,
    4096 on 4Kn disks. Probed with a real read at offset 0 from a page-aligned buffer."""
    probe = mmap.mmap(-1, 4096)
    try:
        with memoryview(probe) as view:
            for align in (512, 4096):
                try:
                    with view[:align] as buf:
                        os.preadv(fd, [buf], 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise BackendError(f"Cannot read drive file '{path}': {exc.strerror}.") from None
    finally:
        probe.close()
    raise BackendError(f"The filesystem holding drive file '{path}' does not support O_DIRECT; "
                       "use direct=off.")


# -- the device ------------------------------------------------------------------------------------
class VirtioBlk(VirtioDevice):
    """A virtio-blk device (one request queue of 256) over an optional :class:`FileBackend`.

    ``read_only`` decides whether VIRTIO_BLK_F_RO is offered (default: the backend's mode, or
    read-write for an empty slot so that any disk can be hot-plugged into it later).
    """

    device_id = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, backend: FileBackend | None = None, *, name: str = "blk",
                 read_only: bool | None = None):
        super().__init__(name)
        self._backend = backend
        self.read_only = backend.read_only if read_only is None and backend is not None else bool(read_only)
        self._io_error_logged = False
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
    def set_backend(self, backend: FileBackend | None) -> None:
        """Replace the drive (None empties the slot); see the module docstring. Any thread."""
        capacity = backend.capacity if backend is not None else 0
        with self.lock:  # waits for the request in flight on the old backend
            old, self._backend = self._backend, backend
            self._io_error_logged = False
            # Under the device lock, so a driver reset cannot slip between "active" and the
            # config interrupt (a reset device must show no pending interrupt).
            self._update_config(CONFIG_CAPACITY, capacity.to_bytes(8, "little"))
        if old is not None and old is not backend:
            try:
                if not old.read_only:
                    old.flush()
            except OSError as exc:
                log.warning("%s: flushing %s before replacing it failed: %s", self.name, old.path, exc.strerror)
            old.close()
        log.info("%s: backend %s, %d sectors", self.name, backend.path if backend else "none", capacity)

    def flush(self) -> None:
        """Flush the backend to stable storage (e.g. on quit); errors are logged."""
        with self.lock:
            backend = self._backend
            if backend is None or backend.read_only:
                return
            try:
                backend.flush()
            except OSError as exc:
                log.warning("%s: flush of %s failed: %s", self.name, backend.path, exc.strerror)

    def close(self) -> None:
        """Flush and close the backend; the slot is empty afterwards."""
        self.flush()
        with self.lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    # -- request processing (I/O thread, lock held) ----------------------------------------------
    def process_queue(self, index: int) -> bool:
        queue = self.queues[index] if index < len(self.queues) else None
        if queue is None:
            return False
        return self.serve_batch(queue, self._handle, BATCH)

    def _handle(self, chain: DescChain) -> int:
        """Execute one request; returns the number of bytes written to its writable buffers."""
        if chain.readable_len < REQUEST_HEADER:
            raise QueueError(f"virtio-blk request {chain.head} has a {chain.readable_len}-byte header "
                             f"(needs {REQUEST_HEADER})")
        writable_len = chain.writable_len
        if writable_len < 1:
            raise QueueError(f"virtio-blk request {chain.head} has no status byte")
        mem = self.mem
        rtype, _reserved, sector = _REQ_HEADER.unpack(read_buffers(mem, chain.readable, REQUEST_HEADER))
        _, data_out = split_buffers(chain.readable, REQUEST_HEADER)
        data_in, status_buf = split_buffers(chain.writable, writable_len - 1)
        status, written = self._execute(rtype, sector, data_out, data_in)
        write_buffers(mem, status_buf, bytes((status,)))
        return written + 1

    def _execute(self, rtype: int, sector: int, data_out: Buffers, data_in: Buffers) -> tuple[int, int]:
        backend = self._backend
        try:
            if rtype == VIRTIO_BLK_T_IN:
                n = sum(length for _, length in data_in)
                if not self._range_ok(sector, n):
                    return VIRTIO_BLK_S_IOERR, 0
                if n:
                    self._with_views(data_in, lambda views: backend.readv(sector << SECTOR_SHIFT, views))
                return VIRTIO_BLK_S_OK, n
            if rtype == VIRTIO_BLK_T_OUT:
                n = sum(length for _, length in data_out)
                if self._writes_refused() or not self._range_ok(sector, n):
                    return VIRTIO_BLK_S_IOERR, 0
                if n:
                    self._with_views(data_out, lambda views: backend.writev(sector << SECTOR_SHIFT, views))
                return VIRTIO_BLK_S_OK, 0
            if rtype == VIRTIO_BLK_T_FLUSH:
                if backend is not None and not backend.read_only:
                    backend.flush()
                return VIRTIO_BLK_S_OK, 0
            if rtype == VIRTIO_BLK_T_GET_ID:
                serial = (backend.serial or "") if backend is not None else ""
                ident = serial.encode("ascii", "replace")[:ID_BYTES].ljust(ID_BYTES, b"\0")
                return VIRTIO_BLK_S_OK, write_buffers(self.mem, data_in, ident)
            if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                return self._discard_or_zero(rtype, data_out), 0
            return VIRTIO_BLK_S_UNSUPP, 0
        except OSError as exc:
            self._log_io_error(rtype, sector, exc)
            return VIRTIO_BLK_S_IOERR, 0

    def _with_views(self, bufs: Buffers, fn) -> None:
        views = [self.mem.view(addr, length) for addr, length in bufs]
        try:
            fn(views)
        finally:
            for v in views:
                v.release()

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        if nbytes % SECTOR_SIZE:
            return False  # data must be whole sectors (spec §5.2.6)
        # Checked against the backend itself, not the config field: during a hot-replace the
        # backend changes first, and a request sized for the old disk must not run off (or, on
        # a write, extend) the new one.
        backend = self._backend
        capacity = backend.capacity if backend is not None else 0
        return sector + (nbytes >> SECTOR_SHIFT) <= capacity

    def _writes_refused(self) -> bool:
        backend = self._backend
        return self.read_only or (backend is not None and backend.read_only)

    def _discard_or_zero(self, rtype: int, data_out: Buffers) -> int:
        discard = rtype == VIRTIO_BLK_T_DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.negotiated(feature):
            return VIRTIO_BLK_S_UNSUPP
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        size = sum(length for _, length in data_out)
        if size == 0 or size % SEGMENT.size or size // SEGMENT.size > max_seg:
            return VIRTIO_BLK_S_IOERR
        data = read_buffers(self.mem, data_out)
        segments = [SEGMENT.unpack_from(data, off) for off in range(0, size, SEGMENT.size)]
        # Flags first: unknown flags (and UNMAP on a discard) are UNSUPP whatever else is wrong.
        for _sector, _num, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP
        if self._writes_refused():
            return VIRTIO_BLK_S_IOERR
        for sector, num, _flags in segments:
            if num > max_sectors or not self._range_ok(sector, num << SECTOR_SHIFT):
                return VIRTIO_BLK_S_IOERR
        backend = self._backend
        for sector, num, flags in segments:
            if not num:
                continue
            if discard:
                backend.discard(sector << SECTOR_SHIFT, num << SECTOR_SHIFT)
            else:
                backend.write_zeroes(sector << SECTOR_SHIFT, num << SECTOR_SHIFT,
                                     bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return VIRTIO_BLK_S_OK

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
