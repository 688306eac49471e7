"""The host side of a disk: the drive specification (:class:`DriveConfig`) and the open image
behind it (:class:`FileBackend`): buffered or O_DIRECT I/O between guest-memory views and a
host file or block device, flush, hole punching.

One spec serves every way a disk comes to be: the command line's ``-drive``, the ``-config``
file's ``drive`` entries and QMP's ``blockdev-add`` all produce a :class:`DriveConfig`, and
:meth:`FileBackend.open` is the one place that looks at the host file (once: stat, open, fstat,
the O_DIRECT alignment probe). The virtio protocol on top is :mod:`.blk`'s business.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import PyStratoVirtError
from ..util.libc import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
SECTOR_SHIFT = 9


@dataclass(frozen=True)
class DriveConfig:
    """A disk image as the user named it: the backend of one block slot.

    ``id`` is StratoVirt's drive id / QMP node-name. ``direct``: open with O_DIRECT (the
    command line's and QMP's default). ``no_flush``: QMP's ``cache.no-flush`` (QEMU's
    ``cache=unsafe``): the guest's flush requests succeed without reaching stable storage, and
    neither unplug nor shutdown syncs the file. ``iops``: at most this many requests per second
    (None: unthrottled). The parsers that build one check the field syntax and lengths; the file
    itself is checked when it is opened.
    """

    id: str
    path: str
    read_only: bool = False
    direct: bool = True
    no_flush: bool = False
    iops: int | None = None


BOUNCE_SIZE = 1 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENODEV)

#: os.preadv or os.pwritev: (fd, buffers, offset) -> bytes transferred.
VectorIo = Callable[[int, Sequence[memoryview], int], int]


def _io_all(op: VectorIo, fd: int, views: Sequence[memoryview], offset: int) -> None:
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


class BackendError(PyStratoVirtError):
    """A drive file cannot be used; the message is one sentence for the user."""


class FileBackend:
    """A drive: an open host file or block device (``identity``: its (st_dev, st_ino), so that
    one image is never attached twice).

    Takes ownership of ``fd``. ``direct`` means the fd was opened with O_DIRECT: transfers whose
    file offset and length are multiples of ``align`` go straight between guest memory and the
    disk when the guest buffers are aligned too, else through a page-aligned anonymous mmap
    bounce buffer; requests not aligned to ``align`` in the file (possible when the host needs
    4 KiB alignment and the guest writes 512-byte sectors) clear O_DIRECT on the fd for that one
    transfer, which Linux keeps coherent with the direct transfers around it.

    Used by one I/O thread at a time (the device lock serialises it); not thread-safe itself.
    """

    def __init__(self, fd: int, *, path: str | None = None, read_only: bool = False,
                 direct: bool = False, size: int | None = None, align: int = SECTOR_SIZE,
                 no_flush: bool = False, iops: int | None = None):
        self.fd = fd
        self.path = path if path is not None else f"fd {fd}"
        self.read_only = read_only
        self.direct = direct
        self.no_flush = no_flush
        self.iops = iops
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        self.size = size if size is not None else _fd_size(fd)
        self.align = align
        self._bounce = mmap.mmap(-1, BOUNCE_SIZE) if direct else None

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors (a trailing partial sector is not addressable)."""
        return self.size >> SECTOR_SHIFT

    @classmethod
    def open(cls, config: DriveConfig) -> FileBackend:
        """Open the image ``config`` names; raises BackendError with a one-sentence reason."""
        path, read_only, direct = config.path, config.read_only, config.direct
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            raise BackendError(f"Drive file '{path}' does not exist: {exc.strerror}.") from None
        except PermissionError:
            raise BackendError(f"Permission denied looking up drive file '{path}'.") from None
        except OSError as exc:
            raise BackendError(f"Cannot access drive file '{path}': {exc.strerror}.") from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise BackendError(f"Drive file '{path}' is not a regular file or block device.")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise BackendError(_open_error(path, exc, read_only, direct)) from exc
        try:
            st = os.fstat(fd)  # what we opened, not what we looked at (the path may have changed)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise BackendError(f"Drive file '{path}' is not a regular file or block device.")
            align = _probe_direct_alignment(fd, path) if direct else SECTOR_SIZE
            return cls(fd, path=path, read_only=read_only, direct=direct, align=align,
                       no_flush=config.no_flush, iops=config.iops)
        except BaseException:
            os.close(fd)
            raise

    # -- data transfer ---------------------------------------------------------------------------
    def readv(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` from the file at ``offset``; raises OSError."""
        if not self.direct and len(views) == 1:
            # The common request (one guest buffer, page cache): one call, nothing built.
            n = os.preadv(self.fd, views, offset)
            if n != len(views[0]):
                _io_all(os.preadv, self.fd, [views[0][n:]], offset + n)
            return
        self._transfer(os.preadv, offset, views, reading=True)

    def writev(self, offset: int, views: Sequence[memoryview]) -> None:
        """Write ``views`` to the file at ``offset``; raises OSError."""
        if self.read_only:
            raise OSError(errno.EROFS, "read-only drive")
        if not self.direct and len(views) == 1:
            n = os.pwritev(self.fd, views, offset)
            if n != len(views[0]):
                _io_all(os.pwritev, self.fd, [views[0][n:]], offset + n)
            return
        self._transfer(os.pwritev, offset, views, reading=False)

    def _transfer(self, op: VectorIo, offset: int, views: Sequence[memoryview], reading: bool) -> None:
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
        with memoryview(self._bounce) as bounce:  # type: ignore[arg-type]  # made when direct is set
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
        """Make written data durable (nothing to do read-only, or with ``no_flush``)."""
        if self.read_only or self.no_flush:
            return
        # fdatasync: the data and the metadata needed to read it back (block allocation) reach
        # stable storage; timestamps do not matter to the guest.
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range if the host can; a host without hole punching ignores it (discard
        is advisory: spec §5.2.6.2, the device MAY deallocate)."""
        if self.read_only:
            raise OSError(errno.EROFS, "read-only drive")
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
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
                fallocate(self.fd, mode, offset, length)
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
