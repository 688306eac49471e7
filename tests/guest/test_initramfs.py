"""Tests of the newc cpio writer/reader (pystratovirt.guest.initramfs).

The archives are checked with our own reader and, independently, with GNU
cpio from Debian (listing and extraction), since the kernel's unpacker is
at least as strict as GNU cpio about headers and padding.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pystratovirt.guest.initramfs import HEADER_SIZE, MAGIC, TRAILER, CpioError, CpioWriter, read_newc

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")


def sample() -> CpioWriter:
    cpio = CpioWriter()
    cpio.add_dir("bin")
    cpio.add_file("bin/tool", b"\x7fELF" + b"x" * 9, 0o755)  # 13 bytes: needs padding
    cpio.add_symlink("bin/sh", "tool")
    cpio.add_file("etc/deep/nested/conf", "key=value\n", 0o640)  # implicit parents
    cpio.add_file("empty", b"")
    cpio.add_dir("tmp", 0o1777)
    cpio.add_device("dev/console", "c", 5, 1, 0o600)
    cpio.add_device("dev/vda", "b", 254, 0, 0o660)
    cpio.add_symlink("/abs/link", "/bin/tool")  # leading slash is stripped from the name
    return cpio


def by_name(data: bytes) -> dict:
    return {e.name: e for e in read_newc(data)}


def test_roundtrip_kinds_modes_and_data() -> None:
    entries = by_name(sample().getvalue())
    assert entries["bin"].kind == "dir" and entries["bin"].perm == 0o755
    tool = entries["bin/tool"]
    assert tool.kind == "file" and tool.perm == 0o755 and tool.data == b"\x7fELF" + b"x" * 9
    assert entries["bin/sh"].kind == "symlink" and entries["bin/sh"].data == b"tool"
    assert entries["bin/sh"].perm == 0o777
    assert entries["etc/deep/nested/conf"].perm == 0o640
    assert entries["etc/deep/nested/conf"].data == b"key=value\n"
    assert entries["empty"].data == b"" and entries["empty"].kind == "file"
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    console = entries["dev/console"]
    assert console.kind == "chr" and (console.rdevmajor, console.rdevminor) == (5, 1)
    assert console.perm == 0o600
    vda = entries["dev/vda"]
    assert vda.kind == "blk" and (vda.rdevmajor, vda.rdevminor) == (254, 0)
    assert entries["abs/link"].data == b"/bin/tool"


def test_owner_root_links_and_unique_inodes() -> None:
    entries = read_newc(sample().getvalue())
    assert all(e.uid == 0 and e.gid == 0 for e in entries)
    assert all(e.nlink == (2 if e.kind == "dir" else 1) for e in entries)
    inodes = [e.ino for e in entries]
    assert len(set(inodes)) == len(inodes) and 0 not in inodes


def test_parents_come_before_children() -> None:
    names = [e.name for e in read_newc(sample().getvalue())]
    assert names.index("etc") < names.index("etc/deep") < names.index("etc/deep/nested")
    assert names.index("etc/deep/nested") < names.index("etc/deep/nested/conf")
    assert names.index("dev") < names.index("dev/console")


def test_layout_padding_and_trailer() -> None:
    data = sample().getvalue()
    assert len(data) % 4 == 0
    pos = 0
    seen_trailer = False
    while pos < len(data):
        assert pos % 4 == 0, "every header starts 4-byte aligned"
        assert data[pos:pos + 6] == MAGIC
        namesize = int(data[pos + 94:pos + 102], 16)
        filesize = int(data[pos + 54:pos + 62], 16)
        check = int(data[pos + 102:pos + 110], 16)
        assert check == 0
        name_end = pos + HEADER_SIZE + namesize
        name = data[pos + HEADER_SIZE:name_end - 1].decode()
        assert data[name_end - 1] == 0, "name is NUL-terminated"
        data_start = name_end + (-name_end % 4)
        assert data[name_end:data_start] == b"\0" * (data_start - name_end)
        data_end = data_start + filesize
        next_pos = data_end + (-data_end % 4)
        assert data[data_end:next_pos] == b"\0" * (next_pos - data_end)
        pos = next_pos
        if name == TRAILER:
            seen_trailer = True
            assert filesize == 0 and pos == len(data), "trailer ends the archive"
    assert seen_trailer


def test_gzip_output_is_reproducible(tmp_path: Path) -> None:
    first = sample().write(tmp_path / "a.cpio.gz")
    second = sample().write(tmp_path / "b.cpio.gz")
    assert first.read_bytes()[:2] == b"\x1f\x8b"
    assert first.read_bytes() == second.read_bytes()
    assert gzip.decompress(first.read_bytes()) == sample().getvalue()
    assert by_name(first.read_bytes()).keys() == by_name(sample().getvalue()).keys()
    raw = sample().write(tmp_path / "c.cpio", compress=False)
    assert raw.read_bytes() == sample().getvalue()


def test_writer_rejects_bad_input() -> None:
    cpio = CpioWriter()
    cpio.add_file("a/file", b"1")
    with pytest.raises(CpioError, match="duplicate"):
        cpio.add_file("a/file", b"2")
    with pytest.raises(CpioError, match="not a directory"):
        cpio.add_file("a/file/below", b"x")
    with pytest.raises(CpioError, match="bad archive path"):
        cpio.add_file("../escape", b"x")
    with pytest.raises(CpioError, match="bad archive path"):
        cpio.add_dir("/")
    with pytest.raises(CpioError, match="'c' or 'b'"):
        cpio.add_device("dev/x", "p", 1, 1)
    with pytest.raises(CpioError, match="empty symlink"):
        cpio.add_symlink("l", "")
    with pytest.raises(CpioError, match="duplicate"):
        cpio.add_dir("a", 0o700)  # exists, implicitly, with another mode
    cpio.add_dir("a")  # same directory again is fine
    assert "a/file" in cpio and "/a" in cpio


def test_reader_is_strict() -> None:
    data = sample().getvalue()
    with pytest.raises(CpioError, match="magic"):
        read_newc(b"070707" + data[6:])
    with pytest.raises(CpioError):
        read_newc(data[: len(data) // 2])
    trailer_at = data.index(TRAILER.encode()) - HEADER_SIZE
    with pytest.raises(CpioError, match="no trailer"):
        read_newc(data[:trailer_at])
    corrupt = bytearray(data)
    first_name_end = HEADER_SIZE + int(data[94:102], 16)
    if first_name_end % 4:
        corrupt[first_name_end] = 1  # non-zero padding after the first name
        with pytest.raises(CpioError, match="padding"):
            read_newc(bytes(corrupt))


def test_add_tree_copies_host_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "run").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "sub" / "run", 0o750)
    os.symlink("sub/run", src / "link")
    cpio = CpioWriter()
    cpio.add_tree("opt", src)
    entries = by_name(cpio.getvalue())
    assert entries["opt/sub/run"].perm == 0o750 and entries["opt/sub/run"].data == b"#!/bin/sh\n"
    assert entries["opt/link"].kind == "symlink" and entries["opt/link"].data == b"sub/run"


@needs_cpio
def test_gnu_cpio_lists_the_archive(tmp_path: Path) -> None:
    archive = sample().write(tmp_path / "s.cpio", compress=False)
    out = subprocess.run(["cpio", "-it", "--quiet", "-H", "newc"], stdin=archive.open("rb"),
                         check=True, stdout=subprocess.PIPE, text=True).stdout.split()
    assert out == [e.name for e in read_newc(archive.read_bytes())]
    verbose = subprocess.run(["cpio", "-itv", "--quiet", "-H", "newc"], stdin=archive.open("rb"),
                             check=True, stdout=subprocess.PIPE, text=True).stdout
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in verbose.splitlines()}
    assert lines["bin/tool"].startswith("-rwxr-xr-x") and " root " in lines["bin/tool"]
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("bin/sh -> tool")
    assert lines["dev/console"].startswith("crw-------")
    assert lines["dev/vda"].startswith("brw-rw----")
    assert lines["tmp"].startswith("drwxrwxrwt")


@needs_cpio
def test_gnu_cpio_extracts_the_archive(tmp_path: Path) -> None:
    archive = sample().write(tmp_path / "s.cpio", compress=False)
    dest = tmp_path / "out"
    dest.mkdir()
    root = os.geteuid() == 0
    cmd = ["cpio", "-idm", "--quiet", "-H", "newc", "--no-absolute-filenames"]
    proc = subprocess.run(cmd, cwd=dest, stdin=archive.open("rb"), capture_output=True,
                          text=True)
    if root:
        assert proc.returncode == 0, proc.stderr
    assert (dest / "bin" / "tool").read_bytes() == b"\x7fELF" + b"x" * 9
    assert stat.S_IMODE(os.stat(dest / "bin" / "tool").st_mode) == 0o755
    assert os.readlink(dest / "bin" / "sh") == "tool"
    assert (dest / "etc/deep/nested/conf").read_text() == "key=value\n"
    assert stat.S_IMODE(os.stat(dest / "etc/deep/nested/conf").st_mode) == 0o640
    assert (dest / "empty").read_bytes() == b""
    if root:  # mknod needs privileges
        console = os.lstat(dest / "dev" / "console")
        assert stat.S_ISCHR(console.st_mode)
        assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
        vda = os.lstat(dest / "dev" / "vda")
        assert stat.S_ISBLK(vda.st_mode) and os.major(vda.st_rdev) == 254
        assert os.stat(dest / "bin" / "tool").st_uid == 0


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_names, st.binary(max_size=64), min_size=1, max_size=8))
def test_property_files_roundtrip(files: dict[str, bytes]) -> None:
    cpio = CpioWriter()
    for name, data in files.items():
        cpio.add_file(f"d/{name}", data, 0o600)
    entries = by_name(cpio.getvalue())
    assert entries["d"].kind == "dir"
    for name, data in files.items():
        assert entries[f"d/{name}"].data == data
        assert entries[f"d/{name}"].perm == 0o600
