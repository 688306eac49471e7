"""Property-based fuzzing: whatever the file holds, load_kernel returns a BootInfo or raises BootError."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boot.bootimages import compress, make_bzimage, vmlinux
from pystratovirt.boot import BootError, BootInfo, load_kernel
from pystratovirt.boot.payload import PayloadError, decompress
from pystratovirt.memory import GuestMemory
from pystratovirt.memory.layout import MiB

SETTINGS = settings(max_examples=int(os.environ.get("BOOT_FUZZ_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BASES = {
    "elf": vmlinux(),
    **{f"bz-{c}": make_bzimage(compress(c, vmlinux())) for c in ("gzip", "xz", "lz4", "zstd")},
}


@pytest.fixture(scope="module")
def fuzz_mem():
    m = GuestMemory(128 * MiB)
    yield m
    m.close()


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "kernel"


def boot(mem, path, data: bytes, **kw):
    path.write_bytes(data)
    try:
        info = load_kernel(mem, path, "console=ttyS0", **kw)
    except BootError as exc:
        assert str(exc)
        return None
    assert isinstance(info, BootInfo)
    assert mem.contains(info.entry, 1)
    return info


@st.composite
def mutated(draw):
    base = BASES[draw(st.sampled_from(sorted(BASES)))]
    data = bytearray(base)
    # concentrate on the headers (setup header, ELF header + phdrs), sometimes hit anything
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            pos = draw(st.integers(0, min(len(data), 0x1100) - 1))
        else:
            pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@SETTINGS
@given(data=st.binary(max_size=4096))
def test_random_bytes(fuzz_mem, kernel_path, data):
    boot(fuzz_mem, kernel_path, data)


@SETTINGS
@given(prefix=st.sampled_from([b"\x7fELF\x02\x01\x01", b"\x7fELF", b"MZ" + bytes(0x200)]),
       body=st.binary(max_size=2048))
def test_magic_prefixed_garbage(fuzz_mem, kernel_path, prefix, body):
    boot(fuzz_mem, kernel_path, prefix + body)


@SETTINGS
@given(data=st.binary(min_size=0x300, max_size=0x1000))
def test_garbage_with_hdrs(fuzz_mem, kernel_path, data):
    data = bytearray(data)
    data[0x1FE:0x206] = b"\x55\xaaxjHdrS"
    data[0x201] = 0x6A
    boot(fuzz_mem, kernel_path, bytes(data))


@SETTINGS
@given(data=mutated(), extract=st.booleans())
def test_mutated_kernels(fuzz_mem, kernel_path, data, extract):
    boot(fuzz_mem, kernel_path, data, extract_payload=extract)


@SETTINGS
@given(codec=st.sampled_from(["gzip", "xz", "lz4", "zstd"]), body=st.binary(max_size=512),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 10**6))
def test_payload_decoders(codec, body, flips, cut):
    blob = bytearray(compress(codec, body + vmlinux()[:256]))
    for pos, val in flips:
        blob[pos % len(blob)] = val
    blob = bytes(blob[:max(4, cut % (len(blob) + 1))])
    try:
        decompress(blob, limit=1 << 24)
    except PayloadError:
        pass
