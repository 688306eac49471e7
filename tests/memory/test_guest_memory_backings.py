"""The three backings of guest RAM (anonymous, file MAP_PRIVATE, shared memfd), what discard and
populate do to each, and the sparse save, checked through /proc/self/smaps, st_blocks and a
second mapping of the same file or memfd."""

import mmap
import os
import time

import pytest

from cpu.cpu_guest_helpers import CODE_ADDR, make_vm, write_boot_tables
from pystratovirt.cpu import Topology, configure_vcpu
from pystratovirt.kvm import IoOut
from pystratovirt.memory import Backing, GuestMemory, GuestMemoryError, layout
from pystratovirt.memory.layout import GiB, MiB

PAGE = 4096


def smaps_of(mem: GuestMemory) -> dict[str, int]:
    """The /proc/self/smaps fields (in bytes) of the mapping that starts at mem.host_base."""
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not line[0].isupper():
                if inside:
                    break
                inside = int(head.split("-")[0], 16) == mem.host_base
            elif inside and line.split()[-1] == "kB":
                fields[head.rstrip(":")] = int(line.split()[1]) * 1024
    assert fields, "mapping not found"
    return fields


def allocated(path_or_fd) -> int:
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return st.st_blocks * 512


@pytest.fixture
def ram_file(tmp_path):
    """A 16 MiB file with a marker in the first bytes of every MiB, written back to disk."""
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        for mib in range(16):
            f.seek(mib * MiB)
            f.write(b"MiB %02d" % mib)
        f.flush()
        os.fsync(f.fileno())  # clean page cache pages: they show as Shared_Clean below
    return path


# -- file, MAP_PRIVATE ---------------------------------------------------------------------------
def test_file_backing_reads_the_file_lazily_and_never_writes_it(ram_file):
    mem = GuestMemory.from_file(ram_file, 16 * MiB)
    try:
        assert mem.backing is Backing.FILE and mem.fd is None
        assert smaps_of(mem)["Rss"] == 0  # nothing read up front
        assert mem.read(3 * MiB, 6) == b"MiB 03"
        mem.write(3 * MiB, b"guest!")
        mem.write_u64(5 * MiB + 8, 0x1122334455667788)
        assert mem.read(3 * MiB, 6) == b"guest!"
        with open(ram_file, "rb") as f:
            f.seek(3 * MiB)
            assert f.read(6) == b"MiB 03"  # copy-on-write: the file is untouched
        assert smaps_of(mem)["Private_Dirty"] == 2 * PAGE
        mem.discard(3 * MiB, PAGE)  # drops the private copy: the file's bytes show again
        assert mem.read(3 * MiB, 6) == b"MiB 03"
        assert smaps_of(mem)["Private_Dirty"] == PAGE
        with pytest.raises(GuestMemoryError):
            mem.read(16 * MiB - 2, 4)  # bounds checks as for anonymous RAM
    finally:
        mem.close()


def test_two_file_mappings_share_the_unchanged_pages(ram_file):
    a = GuestMemory.from_file(ram_file, 16 * MiB)
    b = GuestMemory.from_file(ram_file, 16 * MiB)
    try:
        a.populate()  # MADV_POPULATE_READ: page-cache pages, not private copies
        b.populate()
        for mem in (a, b):
            smaps = smaps_of(mem)
            assert smaps["Rss"] == 16 * MiB
            assert smaps["Shared_Clean"] == 16 * MiB  # each page is mapped twice
            assert smaps["Private_Dirty"] == 0
            assert smaps["Pss"] <= 8 * MiB + PAGE  # so each mapping is charged half
        a.write(0, b"x" * (2 * PAGE))
        assert smaps_of(a)["Private_Dirty"] == 2 * PAGE
        assert smaps_of(b)["Private_Dirty"] == 0
        assert b.read(0, 6) == b"MiB 00"
    finally:
        a.close()
        b.close()


def test_file_backing_refuses_a_file_of_the_wrong_kind(tmp_path, ram_file):
    with pytest.raises(GuestMemoryError, match=r"holds 16777216 bytes, but guest RAM is 33554432 bytes"):
        GuestMemory.from_file(ram_file, 32 * MiB)
    with pytest.raises(GuestMemoryError, match="cannot open guest memory file .*: No such file"):
        GuestMemory.from_file(tmp_path / "absent", 16 * MiB)
    with pytest.raises(GuestMemoryError, match="is not a regular file"):
        GuestMemory.from_file(tmp_path, 16 * MiB)
    with pytest.raises(ValueError):
        GuestMemory.from_file(ram_file, 16 * MiB + 1)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(GuestMemoryError):
            GuestMemory.from_file(ram_file, 32 * MiB)
    assert len(os.listdir("/proc/self/fd")) == before  # no fd leaks on the error paths


# -- shared memfd --------------------------------------------------------------------------------
def test_shared_memfd_is_seen_by_a_second_mapping(tmp_path):
    mem = GuestMemory.shared(16 * MiB)
    other = mmap.mmap(mem.fd, 16 * MiB, flags=mmap.MAP_SHARED)
    try:
        assert mem.backing is Backing.SHARED and isinstance(mem.fd, int)
        mem.write(5 * MiB, b"from the VMM")
        assert other[5 * MiB:5 * MiB + 12] == b"from the VMM"
        other[7 * MiB:7 * MiB + 9] = b"from peer"
        assert mem.read(7 * MiB, 9) == b"from peer"
        # Sealed: no holder of the fd can shrink (or grow) it under the VMM.
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, PAGE)
    finally:
        other.close()
        mem.close()


def test_shared_discard_punches_the_memfd(tmp_path):
    mem = GuestMemory.shared(16 * MiB)
    other = mmap.mmap(mem.fd, 16 * MiB, flags=mmap.MAP_SHARED)
    try:
        mem.populate()
        assert allocated(mem.fd) == 16 * MiB
        mem.write(0, b"gone soon")
        mem.discard(0, 8 * MiB)
        assert allocated(mem.fd) == 8 * MiB  # the memory really went back
        assert other[0:9] == b"\0" * 9 and mem.read(0, 9) == b"\0" * 9
        with pytest.raises(GuestMemoryError):
            mem.discard(PAGE // 2, PAGE)
    finally:
        other.close()
        mem.close()


@pytest.mark.kvm
def test_a_guest_on_shared_memory_and_a_peer_mapping_see_each_other(kvm):
    mem = GuestMemory.shared(4 * MiB)
    peer = mmap.mmap(mem.fd, 4 * MiB, flags=mmap.MAP_SHARED)  # as a vhost-user backend would
    write_boot_tables(mem)
    mem.write(CODE_ADDR, bytes.fromhex(
        "48b88877665544332211"  # mov rax, 0x1122334455667788
        "4889042500002000"      # mov [0x200000], rax
        "66ba0005" "ef"         # mov dx, 0x500 ; out dx, eax
        "488b042508002000"      # mov rax, [0x200008]
        "ef"                    # out dx, eax
        "ebfe"))                # jmp $
    lm = make_vm(kvm, memory=mem)
    try:
        vcpu = lm.vm.create_vcpu(0)
        configure_vcpu(vcpu, 0, kvm=kvm, topology=Topology.for_cpus(1), entry_rip=CODE_ADDR,
                       boot_params_addr=layout.ZERO_PAGE_ADDR)
        assert isinstance(vcpu.run(), IoOut)
        assert peer[0x20_0000:0x20_0008] == (0x1122334455667788).to_bytes(8, "little")
        peer[0x20_0008:0x20_000C] = (0xCAFE).to_bytes(4, "little")
        ex = vcpu.run()
        assert isinstance(ex, IoOut) and ex.data == (0xCAFE).to_bytes(4, "little")
    finally:
        peer.close()
        lm.close()


def test_anonymous_backing_has_no_fd():
    mem = GuestMemory(8 * MiB)
    assert mem.backing is Backing.ANONYMOUS and mem.fd is None
    mem.close()
    with pytest.raises(GuestMemoryError, match="closed"):
        mem.read(0, 1)
    mem.close()  # idempotent


# -- sparse save ---------------------------------------------------------------------------------
def test_save_of_a_1_gib_guest_with_a_few_mib_touched_is_small_and_exact(tmp_path):
    mem = GuestMemory(1 * GiB)
    try:
        touched = {}
        for i in range(48):  # 48 runs of 16 pages = 3 MiB of data, spread over the whole GiB
            gpa = (i * 21 * MiB + i * PAGE) % (1 * GiB - 16 * PAGE)
            gpa -= gpa % PAGE
            data = bytes([i + 1]) * (16 * PAGE)
            mem.write(gpa, data)
            touched[gpa] = data
        mem.read(900 * MiB, 2 * MiB)          # mapped as the zero page: present, all zero
        mem.fill(950 * MiB, 1 * MiB, 0)       # allocated, all zero
        start = time.monotonic()
        written = mem.save(tmp_path / "mem")
        elapsed = time.monotonic() - start
        path = tmp_path / "mem"
        assert os.stat(path).st_size == 1 * GiB
        assert written == len(touched) * 16 * PAGE
        assert allocated(path) <= 4 * MiB  # 3 MiB of data plus file-system slack
        assert elapsed < 5, f"saving took {elapsed:.2f} s"
        back = GuestMemory.from_file(path, 1 * GiB)
        try:
            for gpa, data in touched.items():
                assert back.read(gpa, len(data)) == data
            assert back.read(950 * MiB, PAGE) == bytes(PAGE)
        finally:
            back.close()
    finally:
        mem.close()


def test_save_of_file_backed_ram_keeps_the_file_data_and_the_guest_writes(tmp_path, ram_file):
    mem = GuestMemory.from_file(ram_file, 16 * MiB)
    try:
        mem.write(9 * MiB + 100, b"written by the guest")
        mem.write(2 * MiB, bytes(8))  # a page of the file overwritten with zeros: a hole now
        mem.save(tmp_path / "again")
    finally:
        mem.close()
    again = GuestMemory.from_file(tmp_path / "again", 16 * MiB)
    try:
        for mib in range(16):
            if mib != 2:
                assert again.read(mib * MiB, 6) == b"MiB %02d" % mib
        assert again.read(2 * MiB, 8) == bytes(8)
        assert again.read(9 * MiB + 100, 20) == b"written by the guest"
        assert allocated(tmp_path / "again") <= 16 * 64 * 1024  # 15 data pages plus slack
    finally:
        again.close()


def test_save_of_shared_ram_and_dump_to_an_old_file(tmp_path):
    mem = GuestMemory.shared(16 * MiB)
    try:
        mem.write(12 * MiB, b"shared data")
        path = tmp_path / "old"
        path.write_bytes(b"\xff" * (20 * MiB))  # dump_to replaces everything that was there
        with open(path, "r+b") as f:
            assert mem.dump_to(f.fileno()) == PAGE
        assert os.stat(path).st_size == 16 * MiB
        with open(path, "rb") as f:
            data = f.read()
        assert data[12 * MiB:12 * MiB + 11] == b"shared data"
        assert data.count(0) == 16 * MiB - 11
        assert allocated(path) <= 64 * 1024
    finally:
        mem.close()
