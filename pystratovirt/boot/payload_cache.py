"""The extracted-payload cache: a bzImage's vmlinux, decompressed once on the host, kept on disk.

Owns the cache directory and its two kinds of files; the loader decides when to use it.

Where: ``$PYSTRATOVIRT_PAYLOAD_CACHE`` (a directory; ``off`` disables the cache), else
``$XDG_CACHE_HOME/pystratovirt/payload``, else ``~/.cache/pystratovirt/payload``. The directory
must belong to this user and not be writable by others (it is created mode 0700); otherwise the
cache is not used, because what it holds is loaded into the guest.

Entries, ``<sha256 of the bzImage>.elf``: a 72-byte header (magic, the image's SHA-256, the
codec, the payload's decompressed length, the data length, a CRC32 of the data, a CRC32 of the
header) followed by the kernel as :func:`.elf.compact` gives it (11.5 MiB for the lean kernel's
16.7 MiB vmlinux). The key is the image's content, so a rebuilt kernel at the same path never
gets a stale entry. Every read checks the length and both checksums and ignores (with a note) an
entry that fails; CRC32 rather than a second SHA-256 because it is there to catch truncation and
corruption (4.6 GB/s against 1.7 GB/s here): tampering is kept out by the directory being
private, and whoever can write there could write a matching hash as well.

Stat index, ``index/<dev>-<inode>``: (device, inode, size, mtime, ctime) -> the image's SHA-256,
so a start whose kernel file has not changed reads only its setup header instead of reading and
hashing the whole image (measured in bench/README.md). ctime cannot be set by users (``touch``,
``cp -p`` and ``tar`` set mtime only), and a record is written only for a file that was the same
before and after it was read and whose last change is at least RACY_NS old, so a file rewritten
within one timestamp tick of the recording (the "racy git" case) is never trusted on its stat.

Writes go to a temporary file in the same directory and are renamed into place, so readers
(other VMMs starting the same kernel) see a whole entry or none; there is no fsync, since a torn
entry after a crash fails its checks and is rewritten. After each write the oldest entries (by
mtime, which a hit refreshes) are removed until the total fits ``max_bytes``.

The cache never stops a boot: any failure to read or write it becomes a note and the loader
decompresses as if there were no cache.
"""

from __future__ import annotations

import os
import stat
import struct
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

from .payload import SUPPORTED

ENV_DIR = "PYSTRATOVIRT_PAYLOAD_CACHE"
DISABLED_VALUES = ("off", "0", "no", "none", "false")
DEFAULT_MAX_BYTES = 256 << 20       # the lean kernel's entry is 11.5 MiB, a distribution kernel's ~40
MAX_INDEX_RECORDS = 256
RACY_NS = 2_000_000_000             # a kernel file changed this recently is hashed, not trusted
STALE_TMP_NS = 3600 * 1_000_000_000  # temporary files a crashed writer left behind

ENTRY_MAGIC = b"PSTVELF1"
_ENTRY = struct.Struct("<8s32s8sQQII")     # magic, image sha256, codec, decompressed len, data len, crcs
INDEX_MAGIC = b"PSTVIDX1"
_INDEX = struct.Struct("<8sQQQqq32sI")     # magic, dev, ino, size, mtime_ns, ctime_ns, sha256, crc
ENTRY_SUFFIX = ".elf"
TMP_PREFIX = ".tmp-"

_CRC_CHUNK = 1 << 20


class CachedPayload:
    """A verified entry (its length and both checksums were checked when it was found) whose
    data, the compact vmlinux ELF, stays in the file: the loader reads the ELF headers, then each
    segment straight into guest RAM (:meth:`read_into`), possibly much later (the machine copies
    the kernel when the guest first runs). It holds the entry's descriptor until :meth:`close`;
    entries are replaced by rename, never rewritten, so what the descriptor reads is what was
    checked."""

    def __init__(self, codec: str, decompressed_len: int, path: str, fd: int, size: int):
        self.codec = codec
        self.decompressed_len = decompressed_len  # the payload's length before compaction
        self.path = path
        self.size = size                          # bytes of ELF data
        self._fd: int | None = fd

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the ELF data at ``offset``; OSError if the file ended early."""
        if self._fd is None:
            raise OSError(9, "the payload cache entry is closed")
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], _ENTRY.size + offset + got)
            if n <= 0:
                raise OSError(5, f"the payload cache entry {self.path} ended early")
            got += n

    def head(self, length: int) -> bytes:
        """The first ``length`` bytes of the ELF data (at most all of it)."""
        buf = bytearray(min(length, self.size))
        self.read_into(0, memoryview(buf))
        return bytes(buf)

    @property
    def elf(self) -> bytes:
        """All of the ELF data (for tools and tests; the loader reads what it needs)."""
        return self.head(self.size)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def default_directory(environ: Mapping[str, str]) -> Path:
    """The XDG location (``$XDG_CACHE_HOME`` only if absolute, as the spec says)."""
    base = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        home = environ.get("HOME") or os.path.expanduser("~")
        if not os.path.isabs(home):
            raise ValueError("neither XDG_CACHE_HOME nor HOME names an absolute directory")
        base = os.path.join(home, ".cache")
    return Path(base) / "pystratovirt" / "payload"


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class PayloadCache:
    """One cache directory; see the module doc. ``notes`` collects what went wrong, one sentence each."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.notes: list[str] = []
        self._ready: bool | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> tuple[PayloadCache | None, str | None]:
        """(the cache, None), or (None, why there is none)."""
        environ = os.environ if environ is None else environ
        value = environ.get(ENV_DIR, "").strip()
        if value.lower() in DISABLED_VALUES:
            return None, f"the payload cache is disabled ({ENV_DIR}={value})"
        try:
            directory = Path(os.path.abspath(value)) if value else default_directory(environ)
        except (ValueError, OSError) as exc:
            return None, f"the payload cache is not used: {exc}"
        return cls(directory), None

    # -- the directory -------------------------------------------------------------------------
    def _usable(self, create: bool = True) -> bool:
        """Create the directory if needed and check that it is private; decided once. A reader
        (``create`` False) finds nothing in a directory that does not exist, and creates none."""
        if self._ready is None:
            if not create and not os.path.isdir(self.directory):
                return False
            self._ready = False
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                st = os.lstat(self.directory)
            except (OSError, ValueError) as exc:
                self._note(f"the payload cache directory {str(self.directory)!r} cannot be used "
                           f"({getattr(exc, 'strerror', None) or exc}); extracting without it")
                return False
            if not stat.S_ISDIR(st.st_mode):
                self._note(f"the payload cache path {str(self.directory)!r} is not a directory; "
                           f"extracting without it")
            elif st.st_uid != os.geteuid() or st.st_mode & 0o022:
                self._note(f"the payload cache directory {str(self.directory)!r} is not private "
                           f"(owned by another user, or writable by group or others); extracting "
                           f"without it")
            else:
                self._ready = True
        return self._ready

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def entry_path(self, digest: bytes) -> Path:
        return self.directory / f"{digest.hex()}{ENTRY_SUFFIX}"

    def _index_path(self, st: os.stat_result) -> Path:
        return self.directory / "index" / f"{st.st_dev:x}-{st.st_ino:x}"

    def _open_own(self, path: Path) -> int | None:
        """An fd for one of our regular files, or None (missing, a symlink, or not ours)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._note(f"the payload cache entry {path.name} cannot be opened ({exc.strerror or exc})")
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            self._note(f"ignored the payload cache entry {path.name}: not a regular file of ours")
            return None
        return fd

    # -- the stat index ------------------------------------------------------------------------
    def digest_for(self, st: os.stat_result) -> bytes | None:
        """The image hash recorded for a file with exactly this stat, if any."""
        if not self._usable(create=False):
            return None
        fd = self._open_own(self._index_path(st))
        if fd is None:
            return None
        try:
            raw = os.read(fd, _INDEX.size + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(raw) != _INDEX.size:
            return None
        magic, *key, digest, crc = _INDEX.unpack(raw)
        if magic != INDEX_MAGIC or crc != zlib.crc32(raw[:-4]) or tuple(key) != _stat_key(st):
            return None
        return digest

    def remember(self, st: os.stat_result, digest: bytes, now_ns: int | None = None) -> None:
        """Record that the file with stat ``st`` hashes to ``digest`` (unless it changed too recently)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS or not self._usable():
            return
        body = _INDEX.pack(INDEX_MAGIC, *_stat_key(st), digest, 0)[:-4]
        self._write_atomically(self._index_path(st), [body, struct.pack("<I", zlib.crc32(body))])

    # -- entries -------------------------------------------------------------------------------
    def get(self, digest: bytes) -> CachedPayload | None:
        """The verified entry for the image with SHA-256 ``digest``, or None (a miss, or a bad entry)."""
        if not self._usable(create=False):
            return None
        path = self.entry_path(digest)
        fd = self._open_own(path)
        if fd is None:
            return None
        entry = None
        try:
            entry = self._read_entry(fd, path, digest)
            return entry
        except (OSError, ValueError, MemoryError) as exc:
            self._note(f"the payload cache entry {path.name} cannot be read ({getattr(exc, 'strerror', None) or exc})")
            return None
        finally:
            if entry is None:
                os.close(fd)

    def _read_entry(self, fd: int, path: Path, digest: bytes) -> CachedPayload | None:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _ENTRY.size, 0)
        bad = None
        if len(head) < _ENTRY.size:
            bad = "shorter than its header"
        else:
            magic, image, codec, decompressed_len, data_len, data_crc, head_crc = _ENTRY.unpack(head)
            if magic != ENTRY_MAGIC or head_crc != zlib.crc32(head[:-4]):
                bad = "its header is damaged"
            elif image != digest:
                bad = "it belongs to another image"
            elif data_len != size - _ENTRY.size or data_len == 0:
                bad = f"it holds {size - _ENTRY.size} bytes where its header says {data_len}"
            elif size > self.max_bytes:
                bad = f"it is larger than the cache's bound of {self.max_bytes} bytes"
            elif codec.rstrip(b"\0").decode("ascii", "replace") not in SUPPORTED:
                bad = "its codec is unknown"
        if bad is None:
            # The checksum is computed streaming through one small buffer: the data is read again
            # into guest RAM when it is loaded, and an 11.5 MiB copy held meanwhile would be
            # resident for nothing. The file is never mapped, so one truncated under us cannot
            # raise SIGBUS.
            got, crc = 0, 0
            with memoryview(bytearray(_CRC_CHUNK)) as chunk:
                while got < data_len:
                    n = os.preadv(fd, [chunk[:min(_CRC_CHUNK, data_len - got)]], _ENTRY.size + got)
                    if n <= 0:
                        break
                    crc = zlib.crc32(chunk[:n], crc)
                    got += n
            if got != data_len:
                bad = "it was truncated while being read"
            elif crc != data_crc:
                bad = "its data does not match its checksum"
            else:
                try:
                    os.utime(fd)           # most recently used: evicted last
                except OSError:
                    pass
                return CachedPayload(codec.rstrip(b"\0").decode("ascii", "replace"), decompressed_len,
                                     str(path), fd, data_len)
        self._note(f"ignored the payload cache entry {path.name}: {bad}")
        return None

    def put(self, digest: bytes, codec: str, decompressed_len: int, elf: bytes | memoryview) -> Path | None:
        """Store the compact ELF for the image ``digest``; returns the entry's path, or None."""
        data_len = len(elf)
        if not self._usable() or _ENTRY.size + data_len > self.max_bytes or data_len == 0:
            return None
        head = _ENTRY.pack(ENTRY_MAGIC, digest, codec.encode("ascii")[:8], decompressed_len, data_len,
                           zlib.crc32(elf), 0)[:-4]
        path = self.entry_path(digest)
        if not self._write_atomically(path, [head, struct.pack("<I", zlib.crc32(head)), elf]):
            return None
        self._evict(keep=path.name)
        return path

    def _write_atomically(self, path: Path, parts: list) -> bool:
        import tempfile  # only a cache miss writes

        tmp = None
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
            with open(fd, "wb") as f:
                for part in parts:
                    f.write(part)
            os.replace(tmp, path)
            return True
        except OSError as exc:
            self._note(f"the payload cache cannot be written ({exc.strerror or exc}); extracting "
                       f"without it")
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False

    def _evict(self, keep: str) -> None:
        """Remove the least recently used entries beyond max_bytes, old temporary files and surplus
        index records. Another VMM may be doing the same: a file already gone is fine."""
        now = time.time_ns()
        entries = []
        for directory in (self.directory, self.directory / "index"):
            try:
                listing = list(os.scandir(directory))
            except OSError:
                continue
            records = []
            for de in listing:
                try:
                    st = de.stat(follow_symlinks=False)
                except OSError:
                    continue
                if de.name.startswith(TMP_PREFIX):
                    if now - st.st_mtime_ns > STALE_TMP_NS:
                        _unlink(de.path)
                elif directory == self.directory and de.name.endswith(ENTRY_SUFFIX):
                    entries.append((st.st_mtime_ns, de.name, st.st_size, de.path))
                elif directory != self.directory:
                    records.append((st.st_mtime_ns, de.path))
            for _mtime, path in sorted(records)[:max(0, len(records) - MAX_INDEX_RECORDS)]:
                _unlink(path)
        total = sum(e[2] for e in entries)
        for _mtime, name, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if name != keep:
                _unlink(path)
                total -= size


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
