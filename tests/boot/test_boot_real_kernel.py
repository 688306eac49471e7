"""A real distribution bzImage, when one is at hand (PYSTRATOVIRT_TEST_BZIMAGE, else /boot/vmlinuz-*).

Nothing is downloaded: the test is skipped when no kernel file is found.
"""

import glob
import os

import pytest

from pystratovirt.boot import load_kernel
from pystratovirt.boot import bzimage, elf, payload
from pystratovirt.memory import GuestMemory
from pystratovirt.memory.layout import MiB


def _find_kernel():
    env = os.environ.get("PYSTRATOVIRT_TEST_BZIMAGE")
    if env:
        return env if os.path.isfile(env) else None
    for path in sorted(glob.glob("/boot/vmlinuz-*")):
        if os.access(path, os.R_OK):
            return path
    return None


KERNEL = _find_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no real bzImage (set PYSTRATOVIRT_TEST_BZIMAGE)")


@pytest.fixture(scope="module")
def bz():
    with open(KERNEL, "rb") as f:
        return bzimage.parse_bzimage(f.read())


def test_header(bz):
    assert bz.protocol >= 0x020C and bz.has_64bit_entry
    assert bz.header.relocatable_kernel and bz.header.init_size > 0
    assert bz.header.pref_address % bz.header.kernel_alignment == 0


def test_payload_extracts_to_a_vmlinux(bz):
    codec, vmlinux = payload.decompress(bz.payload(), limit=1 << 31)
    image = elf.parse_elf(vmlinux)
    # the kernel is linked to run at pref_address (LOAD_PHYSICAL_ADDR) and enters at its start
    assert image.start == bz.header.pref_address
    assert image.entry == bz.header.pref_address
    # what the in-guest decompressor would need is at least what the ELF occupies
    assert image.end - image.start <= bz.header.init_size


def test_load_kernel_both_ways():
    mem = GuestMemory(512 * MiB)
    try:
        info = load_kernel(mem, KERNEL, "console=ttyS0", nr_cpus=2, max_cpus=4)
        if info.kind.startswith("bzimage-extracted:"):
            assert info.entry == 0x100_0000
        else:  # a codec we do not decode on the host
            assert info.kind == "bzimage"
        plain = load_kernel(mem, KERNEL, "console=ttyS0", extract_payload=False)
        assert plain.kind == "bzimage" and plain.entry % 0x1000 == 0x200
    finally:
        mem.close()
