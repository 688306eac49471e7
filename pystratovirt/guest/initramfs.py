"""newc ("SVR4 with no CRC") cpio archives for guest initramfs images.

Owns the archive format the Linux kernel unpacks into its rootfs at boot: a
writer (directories, regular files, symlinks, device nodes; every entry owned
by uid/gid 0, with a fixed mtime so identical input gives identical bytes),
gzip output, and a reader used by the tests and by the kit's self-check.

Format (see the kernel's Documentation/driver-api/early-userspace/
buffer-format.rst): each entry is a 110-byte ASCII header ``070701`` followed
by thirteen 8-digit hex fields (ino, mode, uid, gid, nlink, mtime, filesize,
devmajor, devminor, rdevmajor, rdevminor, namesize, check), then the NUL
terminated name padded to a multiple of 4 bytes, then the data padded to a
multiple of 4 bytes. A symlink's data is its target. The archive ends with
an entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
# Field order of the newc header after the magic.
FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
    "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check",
)


class CpioError(ValueError):
    """Malformed archive, or an entry the writer cannot represent."""


def _pad4(length: int) -> int:
    return (-length) % 4


@dataclass(frozen=True)
class Entry:
    """One archive member as the reader sees it."""

    name: str
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    ino: int
    rdevmajor: int
    rdevminor: int
    data: bytes

    @property
    def kind(self) -> str:
        """'dir', 'file', 'symlink', 'chr', 'blk', 'fifo' or 'sock'."""
        fmt = stat.S_IFMT(self.mode)
        return {
            stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "sock",
        }.get(fmt, "unknown")

    @property
    def perm(self) -> int:
        return stat.S_IMODE(self.mode)


def _normalise(path: str) -> str:
    """Archive names are relative ("bin/sh"), the way the kernel and cpio expect."""
    parts = [p for p in PurePosixPath("/" + str(path)).parts[1:] if p not in ("", ".")]
    if not parts or ".." in parts:
        raise CpioError(f"bad archive path {path!r}")
    return "/".join(parts)


class CpioWriter:
    """Builds a newc archive in memory.

    Parent directories are added implicitly (mode 0755) the first time a
    path below them is added, so the kernel never meets a file whose
    directory does not exist yet. Adding the same path twice is an error:
    the kernel would silently let the later entry win.
    """

    def __init__(self, mtime: int = 0) -> None:
        self._mtime = mtime
        self._chunks: list[bytes] = []
        self._names: dict[str, int] = {}  # name -> mode, in archive order
        self._next_ino = 1  # 0 is avoided: some tools treat ino 0 as "no inode"
        self._closed = False

    # -- adding entries ---------------------------------------------------
    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = _normalise(path)
        existing = self._names.get(name)
        if existing is not None and existing == stat.S_IFDIR | (mode & 0o7777):
            return  # the same directory may be requested repeatedly
        self._parents(name)
        self._entry(name, stat.S_IFDIR | (mode & 0o7777), b"", nlink=2)

    def add_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        name = _normalise(path)
        self._parents(name)
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data)

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise CpioError(f"empty symlink target for {path!r}")
        name = _normalise(path)
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A device node; ``kind`` is 'c' (character) or 'b' (block)."""
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(kind)
        if fmt is None:
            raise CpioError(f"device kind must be 'c' or 'b', not {kind!r}")
        name = _normalise(path)
        self._parents(name)
        self._entry(name, fmt | (mode & 0o7777), b"", rdev=(major, minor))

    def add_path(self, path: str, source: Path) -> None:
        """Add a host file, symlink or directory (not recursive), keeping its permissions."""
        st = os.lstat(source)
        if stat.S_ISLNK(st.st_mode):
            self.add_symlink(path, os.readlink(source))
        elif stat.S_ISDIR(st.st_mode):
            self.add_dir(path, stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            self.add_file(path, Path(source).read_bytes(), stat.S_IMODE(st.st_mode))
        else:
            raise CpioError(f"{source}: only files, directories and symlinks can be copied")

    def add_tree(self, prefix: str, source: Path) -> None:
        """Add everything below host directory ``source`` under archive path ``prefix``."""
        source = Path(source)
        self.add_dir(prefix)
        for root, dirs, files in os.walk(source):
            dirs.sort()  # deterministic archive order
            rel = Path(root).relative_to(source)
            for name in dirs + sorted(files):
                self.add_path(str(PurePosixPath(prefix) / rel / name), Path(root) / name)

    def __contains__(self, path: str) -> bool:
        return _normalise(path) in self._names

    # -- output -----------------------------------------------------------
    def getvalue(self) -> bytes:
        """The complete archive, trailer included (the writer stays usable)."""
        trailer = self._header(TRAILER, 0, b"", nlink=1, ino=0, rdev=(0, 0), mtime=0)
        return b"".join(self._chunks) + trailer

    def write(self, path: Path, compress: bool = True) -> Path:
        """Write the archive (gzip-compressed unless told otherwise) atomically."""
        data = self.getvalue()
        if compress:
            # mtime=0 in the gzip header keeps the output reproducible.
            data = gzip.compress(data, compresslevel=9, mtime=0)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    # -- internals --------------------------------------------------------
    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            mode = self._names.get(parent)
            if mode is None:
                self._entry(parent, stat.S_IFDIR | 0o755, b"", nlink=2)
            elif not stat.S_ISDIR(mode):
                raise CpioError(f"{parent!r} is not a directory in the archive")

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        if name in self._names:
            raise CpioError(f"duplicate archive path {name!r}")
        self._names[name] = mode
        self._chunks.append(self._header(name, mode, data, nlink=nlink, ino=self._next_ino,
                                         rdev=rdev, mtime=self._mtime))
        self._next_ino += 1

    @staticmethod
    def _header(name: str, mode: int, data: bytes, *, nlink: int, ino: int,
                rdev: tuple[int, int], mtime: int) -> bytes:
        encoded = name.encode() + b"\0"
        values = {
            "ino": ino, "mode": mode, "uid": 0, "gid": 0, "nlink": nlink, "mtime": mtime,
            "filesize": len(data), "devmajor": 0, "devminor": 0,
            "rdevmajor": rdev[0], "rdevminor": rdev[1], "namesize": len(encoded), "check": 0,
        }
        for key, value in values.items():
            if not 0 <= value <= 0xFFFFFFFF:
                raise CpioError(f"{name!r}: {key}={value} does not fit the newc header")
        header = MAGIC + b"".join(b"%08X" % values[f] for f in FIELDS)
        assert len(header) == HEADER_SIZE
        out = header + encoded + b"\0" * _pad4(HEADER_SIZE + len(encoded))
        return out + data + b"\0" * _pad4(len(data))


def read_newc(data: bytes) -> list[Entry]:
    """Parse a newc archive (gzip-compressed or not); the trailer is not returned.

    Strict: a bad magic, a truncated entry, non-zero padding or a missing
    trailer raises CpioError, so tests catch writer mistakes the kernel
    might tolerate silently.
    """
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    entries: list[Entry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(data):
            raise CpioError(f"truncated archive: no trailer (offset {pos})")
        if data[pos:pos + 6] != MAGIC:
            raise CpioError(f"bad magic {data[pos:pos + 6]!r} at offset {pos}")
        try:
            fields = {f: int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i, f in enumerate(FIELDS)}
        except ValueError as exc:
            raise CpioError(f"bad header at offset {pos}") from exc
        pos += HEADER_SIZE
        namesize = fields["namesize"]
        raw_name = data[pos:pos + namesize]
        if len(raw_name) != namesize or not raw_name.endswith(b"\0"):
            raise CpioError(f"bad name field at offset {pos}")
        name = raw_name[:-1].decode()
        pos += namesize
        _expect_zero_padding(data, pos, _pad4(HEADER_SIZE + namesize), name)
        pos += _pad4(HEADER_SIZE + namesize)
        if name == TRAILER:
            return entries
        size = fields["filesize"]
        body = data[pos:pos + size]
        if len(body) != size:
            raise CpioError(f"{name!r}: truncated data")
        pos += size
        _expect_zero_padding(data, pos, _pad4(size), name)
        pos += _pad4(size)
        entries.append(Entry(
            name=name, mode=fields["mode"], uid=fields["uid"], gid=fields["gid"],
            nlink=fields["nlink"], mtime=fields["mtime"], ino=fields["ino"],
            rdevmajor=fields["rdevmajor"], rdevminor=fields["rdevminor"], data=body,
        ))


def _expect_zero_padding(data: bytes, pos: int, length: int, name: str) -> None:
    if data[pos:pos + length] != b"\0" * length:
        raise CpioError(f"{name!r}: padding at offset {pos} is missing or not zero")
