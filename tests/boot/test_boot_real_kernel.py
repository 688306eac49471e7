"""Real bzImages: the guest kit's lean kernel (built once and cached, as the slow tiers use it),
or the one PYSTRATOVIRT_TEST_BZIMAGE names. Nothing is downloaded.
"""

import os

import pytest

from pystratovirt.boot import bzimage, elf, load_kernel, payload
from pystratovirt.memory import GuestMemory
from pystratovirt.memory.layout import MiB


@pytest.fixture
def kernel(request):
    env = os.environ.get("PYSTRATOVIRT_TEST_BZIMAGE")
    if env:
        return env
    if request.config.getoption("--no-slow"):
        pytest.skip("--no-slow given: the lean kernel is built by the slow tier")
    return str(request.getfixturevalue("lean_guest").bzimage)


def _parse(kernel):
    with open(kernel, "rb") as f:
        return bzimage.parse_bzimage(f.read())


def test_header(kernel):
    bz = _parse(kernel)
    assert bz.protocol >= 0x020C and bz.has_64bit_entry
    assert bz.header.init_size > 0
    assert bz.header.pref_address % bz.header.kernel_alignment == 0


def test_payload_extracts_to_a_vmlinux(kernel):
    bz = _parse(kernel)
    codec = payload.detect_codec(bz.payload())
    if codec not in payload.SUPPORTED:
        pytest.skip(f"the kernel's {codec} payload is not decoded on the host")
    _, vmlinux = payload.decompress(bz.payload(), limit=1 << 31)
    image = elf.parse_elf(vmlinux)
    # the kernel is linked to run at pref_address (LOAD_PHYSICAL_ADDR) and enters at its start
    assert image.start == bz.header.pref_address
    assert image.entry == bz.header.pref_address
    # what the in-guest decompressor needs covers what the ELF occupies
    assert image.end - image.start <= bz.header.init_size
    # a kernel built here has its vmlinux beside it: the extracted one must load the same way
    sibling = os.path.join(os.path.dirname(kernel), "vmlinux")
    if os.path.isfile(sibling):
        with open(sibling, "rb") as f:
            built = elf.parse_elf(f.read())
        assert built.entry == image.entry
        assert [(s.paddr, s.filesz, s.memsz) for s in built.segments] == \
            [(s.paddr, s.filesz, s.memsz) for s in image.segments]


def test_load_kernel_both_ways(kernel):
    mem = GuestMemory(512 * MiB)
    try:
        info = load_kernel(mem, kernel, "console=ttyS0", nr_cpus=2, max_cpus=4)
        if info.kind.startswith("bzimage-extracted:"):
            assert info.entry == _parse(kernel).header.pref_address
        else:  # a codec we do not decode on the host
            assert info.kind == "bzimage"
        plain = load_kernel(mem, kernel, "console=ttyS0", extract_payload=False)
        assert plain.kind == "bzimage" and plain.entry % 0x1000 == 0x200
    finally:
        mem.close()


def test_payload_cache_loads_what_extraction_loads(kernel, payload_cache_dir):
    bz = _parse(kernel)
    if payload.detect_codec(bz.payload()) not in payload.SUPPORTED:
        pytest.skip("the kernel's payload is not decoded on the host")
    images = []
    for _ in range(2):          # a miss that fills the cache, then a hit
        mem = GuestMemory(512 * MiB)
        try:
            info = load_kernel(mem, kernel, "console=ttyS0")
            images.append((info.kind, info.entry, info.kernel_end,
                           mem.read(0, 1 * MiB), mem.read(info.entry, info.kernel_end - info.entry)))
        finally:
            mem.close()
        assert info.kind.startswith("bzimage-extracted:")
    assert any("came from the payload cache" in n for n in info.notes)
    assert images[0] == images[1]
