"""The extracted-payload cache: compact ELFs, hits and misses through load_kernel, the stat index,
damaged entries, unusable directories, eviction and concurrent writers."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time

import pytest

from boot.bootimages import START_KERNEL_MAP, compress, make_bzimage, make_elf
from pystratovirt.boot import elf, load_kernel, loader, payload_cache
from pystratovirt.boot.payload_cache import ENTRY_SUFFIX, TMP_PREFIX, PayloadCache
from pystratovirt.memory import GuestMemory
from pystratovirt.memory.layout import MiB

# Two segments with a gap, padding between them in the file, a bss and a non-LOAD header.
KERNEL_ELF = make_elf([
    (0x100_0000, START_KERNEL_MAP + 0x100_0000, b"\x90" * 0x3000 + b"\xf4", 0x3001),
    (0x140_0000, START_KERNEL_MAP + 0x140_0000, os.urandom(0x2345), 0x2345 + 0x5000),
], entry=0x100_0000, extra_phdrs=(4,)) + bytes(0x4000)   # + trailing bytes no segment covers


def bzimage(codec: str = "lz4", kernel: bytes = KERNEL_ELF) -> bytes:
    return make_bzimage(compress(codec, kernel))


def snapshot(mem) -> bytes:
    """The guest RAM a load writes: boot structures and the kernel's segments."""
    return mem.read(0, 0x10_0000) + mem.read(0x100_0000, 0x50_0000)


@pytest.fixture
def racy_off(monkeypatch):
    """Trust the stat of files written a moment ago (the test's own kernels)."""
    monkeypatch.setattr(payload_cache, "RACY_NS", 0)


def entries(directory) -> list:
    return sorted(p for p in directory.iterdir() if p.name.endswith(ENTRY_SUFFIX))


# -- compact ELF ---------------------------------------------------------------------------------
def test_compact_elf_loads_the_same_kernel():
    small = elf.compact(KERNEL_ELF)
    a, b = elf.parse_elf(KERNEL_ELF), elf.parse_elf(small)
    assert len(small) == 64 + 2 * 56 + 0x3001 + 0x2345 < len(KERNEL_ELF)
    assert a.entry == b.entry
    assert [(s.paddr, s.vaddr, s.filesz, s.memsz) for s in a.segments] == \
        [(s.paddr, s.vaddr, s.filesz, s.memsz) for s in b.segments]
    m1, m2 = GuestMemory(64 * MiB), GuestMemory(64 * MiB)
    try:
        m1.fill(0, 64 * MiB, 0x5A)
        m2.fill(0, 64 * MiB, 0x5A)
        elf.load_elf(m1, a, KERNEL_ELF)
        elf.load_elf(m2, b, small)
        assert m1.read(0, 64 * MiB) == m2.read(0, 64 * MiB)
    finally:
        m1.close()
        m2.close()


def test_compact_rejects_what_parse_rejects():
    with pytest.raises(elf.ElfError):
        elf.compact(b"\x7fELF" + bytes(20))


# -- through load_kernel -------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["gzip", "xz", "lz4", "zstd"])
def test_miss_then_hit_loads_the_same_kernel(mem, write_file, payload_cache_dir, codec):
    path = write_file(bzimage(codec))
    first = load_kernel(mem, path, "console=ttyS0")
    assert first.kind == f"bzimage-extracted:{codec}"
    assert any("extracted" in n and "kept in the payload cache" in n for n in first.notes)
    image = snapshot(mem)
    [entry] = entries(payload_cache_dir)
    assert entry.name == hashlib.sha256(path.read_bytes()).hexdigest() + ENTRY_SUFFIX
    assert entry.stat().st_mode & 0o777 == 0o600 and payload_cache_dir.stat().st_mode & 0o777 == 0o700

    mem.fill(0, mem.size, 0)
    second = load_kernel(mem, path, "console=ttyS0")
    assert any("came from the payload cache" in n and codec.upper() in n for n in second.notes)
    assert (second.kind, second.entry, second.kernel_end) == (first.kind, first.entry, first.kernel_end)
    assert snapshot(mem) == image


def test_a_hit_copies_the_kernel_and_initrd_only_when_the_load_is_finished(mem, write_file,
                                                                           payload_cache_dir):
    path = write_file(bzimage())
    initrd = os.urandom(3 * 4096 + 5)
    initrd_path = write_file(initrd)
    load_kernel(mem, path, "console=ttyS0", initrd_path)      # miss: fills the cache
    reference = snapshot(mem)
    fresh = GuestMemory(256 * MiB)
    try:
        load = loader.prepare_kernel(fresh, path, "console=ttyS0", initrd_path)
        assert not load.done and any("came from the payload cache" in n for n in load.info.notes)
        addr, size = load.info.initrd
        # The boot structures are written; the kernel's segments and the initrd are not yet.
        assert fresh.read(0, 0x10_0000) == reference[:0x10_0000]
        assert fresh.read(0x100_0000, 0x3001) == bytes(0x3001)
        assert fresh.read(addr, size) == bytes(size)
        load.finish()
        assert load.done
        assert snapshot(fresh) == reference and fresh.read(addr, size) == initrd
        load.close()                                          # finished: nothing left to release
    finally:
        fresh.close()


def test_a_load_closed_unfinished_releases_its_files(mem, write_file, payload_cache_dir):
    path = write_file(bzimage())
    load_kernel(mem, path, "")
    before = set(os.listdir("/proc/self/fd"))
    load = loader.prepare_kernel(mem, path, "", write_file(b"initrd"))
    assert len(set(os.listdir("/proc/self/fd")) - before) == 2   # the cache entry and the initrd
    load.close()
    assert set(os.listdir("/proc/self/fd")) == before
    load.finish()                                             # nothing left: a no-op


def test_the_key_is_the_content_not_the_path(mem, write_file, payload_cache_dir):
    load_kernel(mem, write_file(bzimage()), "")
    info = load_kernel(mem, write_file(bzimage()), "")      # same bytes, another file
    assert any("came from the payload cache" in n for n in info.notes)
    other = make_elf([(0x100_0000, START_KERNEL_MAP + 0x100_0000, b"\xf4" * 99, 99)], entry=0x100_0000)
    info = load_kernel(mem, write_file(bzimage(kernel=other)), "")
    assert any("kept in the payload cache" in n for n in info.notes)
    assert mem.read(0x100_0000, 99) == b"\xf4" * 99
    assert len(entries(payload_cache_dir)) == 2


def test_stat_index_skips_reading_the_image(mem, write_file, payload_cache_dir, racy_off, monkeypatch):
    path = write_file(bzimage())
    load_kernel(mem, path, "")                               # miss: decompress, store, index
    assert len(list((payload_cache_dir / "index").iterdir())) == 1
    image = snapshot(mem)
    reads = []
    real_data = loader._KernelFile.data
    monkeypatch.setattr(loader._KernelFile, "data", lambda self: reads.append(1) or real_data(self))
    mem.fill(0, mem.size, 0)
    info = load_kernel(mem, path, "")
    assert reads == [] and any("came from the payload cache" in n for n in info.notes)
    assert snapshot(mem) == image


def test_a_rewritten_file_is_not_trusted_on_its_old_stat(mem, write_file, racy_off):
    path = write_file(bzimage())
    load_kernel(mem, path, "")
    before = os.stat(path)
    replacement = make_elf([(0x100_0000, START_KERNEL_MAP + 0x100_0000, b"\xcc" * 0x3001, 0x3001),
                            (0x140_0000, START_KERNEL_MAP + 0x140_0000, os.urandom(0x2345), 0x7345)],
                           entry=0x100_0000, extra_phdrs=(4,)) + bytes(0x4000)
    payload = compress("lz4", replacement)
    new = make_bzimage(payload, tail=b"\xcc" * (before.st_size - len(make_bzimage(payload, tail=b""))))
    assert len(new) == before.st_size
    while True:   # in place, same size, old mtime put back (as tar or cp -p do): only ctime tells
        with open(path, "r+b") as f:
            f.write(new)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if os.stat(path).st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.01)
    info = load_kernel(mem, path, "")
    assert any("kept in the payload cache" in n for n in info.notes)
    assert mem.read(0x100_0000, 0x3001) == b"\xcc" * 0x3001


def test_a_recently_changed_file_gets_no_index_record(tmp_path, write_file):
    cache = PayloadCache(tmp_path / "c")
    path = write_file(b"kernel")
    st = os.stat(path)
    cache.remember(st, b"\1" * 32)                           # changed just now: racy
    assert cache.digest_for(st) is None
    cache.remember(st, b"\1" * 32, now_ns=max(st.st_mtime_ns, st.st_ctime_ns) + payload_cache.RACY_NS)
    assert cache.digest_for(st) == b"\1" * 32
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))      # same mtime put back; ctime moves on
    assert cache.digest_for(os.stat(path)) is None


def test_index_record_must_be_whole(tmp_path, write_file):
    cache = PayloadCache(tmp_path / "c")
    st = os.stat(write_file(b"kernel"))
    cache.remember(st, b"\2" * 32, now_ns=time.time_ns() + payload_cache.RACY_NS)
    [record] = (tmp_path / "c" / "index").iterdir()
    raw = bytearray(record.read_bytes())
    raw[-8] ^= 1
    record.write_bytes(raw)
    assert cache.digest_for(st) is None
    record.write_bytes(raw[:40])
    assert cache.digest_for(st) is None


# -- damaged entries -----------------------------------------------------------------------------
def _damage_data(raw: bytearray) -> bytearray:
    raw[-100] ^= 0xFF
    return raw


@pytest.mark.parametrize("damage,why", [
    (_damage_data, "does not match its checksum"),
    (lambda raw: raw[:len(raw) // 2], "where its header says"),
    (lambda raw: raw[:30], "shorter than its header"),
    (lambda raw: raw[:8] + bytes([raw[8] ^ 1]) + raw[9:], "header is damaged"),
    (lambda raw: bytearray(), "shorter than its header"),
])
def test_damaged_entry_is_ignored_and_replaced(mem, write_file, payload_cache_dir, damage, why):
    path = write_file(bzimage())
    load_kernel(mem, path, "")
    image = snapshot(mem)
    [entry] = entries(payload_cache_dir)
    entry.write_bytes(bytes(damage(bytearray(entry.read_bytes()))))
    mem.fill(0, mem.size, 0)
    info = load_kernel(mem, path, "")
    assert any(why in n and "ignored" in n for n in info.notes)
    assert any("kept in the payload cache" in n for n in info.notes)   # decompressed and rewritten
    assert snapshot(mem) == image
    info = load_kernel(mem, path, "")
    assert any("came from the payload cache" in n for n in info.notes)


def test_entry_of_another_image_is_ignored(mem, write_file, payload_cache_dir):
    a, b = write_file(bzimage("gzip")), write_file(bzimage("zstd"))
    load_kernel(mem, a, "")
    [entry] = entries(payload_cache_dir)
    entry.rename(payload_cache_dir / (hashlib.sha256(b.read_bytes()).hexdigest() + ENTRY_SUFFIX))
    info = load_kernel(mem, b, "")
    assert info.kind == "bzimage-extracted:zstd"
    assert any("belongs to another image" in n for n in info.notes)


def test_symlinked_entry_is_not_followed(mem, write_file, payload_cache_dir, tmp_path):
    path = write_file(bzimage())
    load_kernel(mem, path, "")
    [entry] = entries(payload_cache_dir)
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    info = load_kernel(mem, path, "")
    assert any("cannot be opened" in n for n in info.notes)
    assert info.kind == "bzimage-extracted:lz4"


def test_cached_payload_over_the_ram_limit_falls_back_like_decompression(write_file, payload_cache_dir):
    path = write_file(bzimage())
    digest = hashlib.sha256(path.read_bytes()).digest()
    PayloadCache(payload_cache_dir).put(digest, "lz4", 1 << 40, elf.compact(KERNEL_ELF))
    mem = GuestMemory(128 * MiB)
    try:
        info = load_kernel(mem, path, "")
    finally:
        mem.close()
    assert info.kind == "bzimage" and any("decompresses to more than" in n for n in info.notes)


# -- unusable directories ------------------------------------------------------------------------
def test_unwritable_cache_dir_boots_without_cache(mem, write_file, tmp_path, monkeypatch):
    blocker = write_file(b"a file, not a directory")
    monkeypatch.setenv(payload_cache.ENV_DIR, str(blocker / "payload"))
    path = write_file(bzimage())
    for _ in range(2):
        info = load_kernel(mem, path, "")
        assert info.kind == "bzimage-extracted:lz4"
        assert any("cannot be used" in n and "extracting without it" in n for n in info.notes)
        assert not any("payload cache (" in n for n in info.notes)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_cache_dir_boots_without_cache(mem, write_file, payload_cache_dir):
    payload_cache_dir.mkdir(mode=0o500)
    try:
        info = load_kernel(mem, write_file(bzimage()), "")
    finally:
        payload_cache_dir.chmod(0o700)
    assert info.kind == "bzimage-extracted:lz4"
    assert any("cannot be written" in n for n in info.notes)


def test_cache_dir_writable_by_others_is_not_used(mem, write_file, payload_cache_dir):
    payload_cache_dir.mkdir()
    payload_cache_dir.chmod(0o777)
    info = load_kernel(mem, write_file(bzimage()), "")
    assert info.kind == "bzimage-extracted:lz4"
    assert any("not private" in n for n in info.notes)
    assert list(payload_cache_dir.iterdir()) == []


def test_cache_can_be_turned_off(mem, write_file, payload_cache_dir, monkeypatch):
    path = write_file(bzimage())
    monkeypatch.setenv(payload_cache.ENV_DIR, "off")
    info = load_kernel(mem, path, "")
    assert any("disabled" in n for n in info.notes)
    monkeypatch.setenv(payload_cache.ENV_DIR, str(payload_cache_dir))
    load_kernel(mem, path, "", payload_cache=False)
    load_kernel(mem, path, "", extract_payload=False)
    assert not payload_cache_dir.exists()


def test_default_directory_follows_xdg(tmp_path):
    env = {"HOME": "/home/u"}
    assert str(payload_cache.default_directory(env)) == "/home/u/.cache/pystratovirt/payload"
    env["XDG_CACHE_HOME"] = "/var/cache/u"
    assert str(payload_cache.default_directory(env)) == "/var/cache/u/pystratovirt/payload"
    env["XDG_CACHE_HOME"] = "relative/ignored"
    assert str(payload_cache.default_directory(env)) == "/home/u/.cache/pystratovirt/payload"
    cache, why = PayloadCache.from_environment({payload_cache.ENV_DIR: str(tmp_path / "x")})
    assert cache.directory == tmp_path / "x" and why is None
    cache, why = PayloadCache.from_environment({payload_cache.ENV_DIR: "OFF"})
    assert cache is None and "disabled" in why


# -- size bound ----------------------------------------------------------------------------------
def test_least_recently_used_entries_are_evicted(tmp_path):
    cache = PayloadCache(tmp_path / "c", max_bytes=3 * 1000 + 3 * 72)
    blobs = {bytes([i]) * 32: os.urandom(1000) for i in range(4)}
    keys = list(blobs)
    for k in keys[:3]:
        cache.put(k, "lz4", 1000, blobs[k])
    old = time.time() - 100
    for i, k in enumerate(keys[:3]):           # distinct ages: key 0 oldest
        os.utime(cache.entry_path(k), (old + i, old + i))
    assert cache.get(keys[0]).elf[:] == blobs[keys[0]]   # a hit makes key 0 the newest
    cache.put(keys[3], "lz4", 1000, blobs[keys[3]])
    assert cache.get(keys[1]) is None                  # the least recently used went
    for k in (keys[0], keys[2], keys[3]):
        assert cache.get(k).elf[:] == blobs[k]
    assert cache.put(b"\x09" * 32, "lz4", 1, os.urandom(cache.max_bytes)) is None   # never fits


def test_stale_temporary_files_are_removed(tmp_path):
    cache = PayloadCache(tmp_path / "c")
    cache.put(b"\1" * 32, "lz4", 10, b"x" * 10)
    stale, fresh = tmp_path / "c" / (TMP_PREFIX + "a"), tmp_path / "c" / (TMP_PREFIX + "b")
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in flight")
    os.utime(stale, (time.time() - 7200,) * 2)
    cache.put(b"\2" * 32, "lz4", 10, b"y" * 10)
    assert not stale.exists() and fresh.exists()


# -- concurrency ---------------------------------------------------------------------------------
def _writer_and_reader(directory: str, seed: int) -> list[str]:
    """Put and get the same entries over and over; report anything but a miss or the exact data."""
    cache = PayloadCache(directory, max_bytes=64 * MiB)
    problems = []
    for i in range(30):
        key = bytes([i % 3]) * 32
        data = bytes([i % 3]) * (1 << 20) + key
        if (i + seed) % 2:
            cache.put(key, "zstd", len(data), data)
        got = cache.get(key)
        if got is not None and (got.codec, bytes(got.elf)) != ("zstd", data):
            problems.append(f"process {seed}: wrong data for entry {i % 3}")
    problems += [n for n in cache.notes if "ignored" in n]
    return problems


def test_concurrent_writers_and_readers(tmp_path):
    directory = str(tmp_path / "c")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(_writer_and_reader, [(directory, s) for s in range(4)])
    assert [p for r in results for p in r] == []
    assert not [p for p in os.listdir(directory) if p.startswith(TMP_PREFIX)]
    assert len(entries(tmp_path / "c")) == 3


def _boot_once(args) -> bytes:
    directory, kernel = args
    os.environ[payload_cache.ENV_DIR] = directory
    mem = GuestMemory(64 * MiB)
    try:
        info = load_kernel(mem, kernel, "")
        assert info.kind == "bzimage-extracted:xz", info.notes
        return snapshot(mem)
    finally:
        mem.close()


def test_concurrent_first_starts_of_one_kernel(tmp_path, write_file):
    path = str(write_file(bzimage("xz")))
    with multiprocessing.get_context("fork").Pool(4) as pool:
        images = pool.map(_boot_once, [(str(tmp_path / "c"), path)] * 8)
    assert len(set(images)) == 1
    assert len(entries(tmp_path / "c")) == 1


def test_entry_over_the_bound_or_with_an_unknown_codec_is_ignored(tmp_path):
    cache = PayloadCache(tmp_path / "c", max_bytes=4096)
    cache.put(b"\1" * 32, "lz4", 100, b"x" * 100)
    cache.put(b"\2" * 32, "bzip2", 100, b"y" * 100)      # not a codec the host decodes
    cache.max_bytes = 150                                 # as if the bound had shrunk since
    assert cache.get(b"\1" * 32) is None and cache.get(b"\2" * 32) is None
    assert any("larger than the cache's bound" in n for n in cache.notes)
    cache.max_bytes = 4096
    assert cache.get(b"\1" * 32).elf[:] == b"x" * 100
    assert cache.get(b"\2" * 32) is None and any("codec is unknown" in n for n in cache.notes)


def test_a_reused_cache_reports_each_load_its_own_notes(mem, write_file, tmp_path):
    cache = PayloadCache(tmp_path / "c")
    path = write_file(bzimage())
    load_kernel(mem, path, "", payload_cache=cache)
    [entry] = entries(tmp_path / "c")
    entry.write_bytes(entry.read_bytes()[:100])
    assert any("ignored" in n for n in load_kernel(mem, path, "", payload_cache=cache).notes)
    assert not any("ignored" in n for n in load_kernel(mem, path, "", payload_cache=cache).notes)


def test_kernels_without_a_payload_leave_no_cache_directory(mem, write_file, payload_cache_dir):
    load_kernel(mem, write_file(KERNEL_ELF), "")                     # an ELF vmlinux
    load_kernel(mem, write_file(make_bzimage(compress("bzip2", KERNEL_ELF))), "")  # not host-decoded
    assert not payload_cache_dir.exists()
    load_kernel(mem, write_file(bzimage()), "")
    assert len(entries(payload_cache_dir)) == 1
