"""The MP table parsed back the way Linux's mpparse reads it."""

import struct

import pytest

from pystratovirt.boot import BootError
from pystratovirt.boot.mptable import MAX_CPUS, build_mptable, mptable_size
from pystratovirt.memory.layout import BIOS_ROM_START, EBDA_START, IOAPIC_ADDR, LAPIC_ADDR


def parse(blob: bytes, base: int = EBDA_START):
    """Decode floating pointer + config table from bytes written at ``base``."""
    sig, physptr, length, rev, checksum, features = struct.unpack_from("<4sIBBB5s", blob, 0)
    assert sig == b"_MP_" and length == 1 and rev == 4 and features == bytes(5)
    assert sum(blob[:16]) % 256 == 0
    off = physptr - base
    (sig, tlen, spec, _ck, oem, product, oemptr, oemsize, count, lapic, extlen, extck,
     _res) = struct.unpack_from("<4sHBB8s12sIHHIHBB", blob, off)
    assert sig == b"PCMP" and spec == 4 and extlen == 0 and extck == 0 and oemptr == 0
    assert sum(blob[off:off + tlen]) % 256 == 0
    entries = []
    pos = off + 44
    for _ in range(count):
        kind = blob[pos]
        size = 20 if kind == 0 else 8
        entries.append(blob[pos:pos + size])
        pos += size
    assert pos == off + tlen
    return dict(oem=oem, product=product, lapic=lapic, entries=entries, end=pos)


@pytest.mark.parametrize("nr,mx", [(1, 1), (2, 4), (4, 4), (1, 40), (8, 254)])
def test_mptable_roundtrip(nr, mx):
    blob = build_mptable(nr, mx)
    assert len(blob) == mptable_size(mx)
    t = parse(blob)
    assert t["lapic"] == LAPIC_ADDR and len(t["oem"]) == 8 and len(t["product"]) == 12
    kinds = [e[0] for e in t["entries"]]
    assert kinds == [0] * mx + [1, 2] + [3] * 16 + [4, 4]
    for i, e in enumerate(t["entries"][:mx]):
        _, apic_id, ver, flags, sig, feat = struct.unpack_from("<BBBBII", e)
        assert apic_id == i and ver == 0x14 and sig == 0x600 and feat == 0x201
        assert flags == (1 if i < nr else 0) | (2 if i == 0 else 0)
    bus = t["entries"][mx]
    assert bus[1] == 0 and bus[2:8] == b"ISA   "
    _, ioapic_id, ver, flags, addr = struct.unpack("<BBBBI", t["entries"][mx + 1])
    # The id after the last vCPU's, except that 0xFF is the broadcast id: 254 vCPUs share 254.
    assert (ioapic_id, ver, flags, addr) == (min(mx + 1, 254), 0x11, 1, IOAPIC_ADDR)
    for irq, e in enumerate(t["entries"][mx + 2:mx + 18]):
        assert struct.unpack("<BBHBBBB", e) == (3, 0, 0, 0, irq, ioapic_id, irq)
    extint, nmi = t["entries"][-2:]
    assert struct.unpack("<BBHBBBB", extint) == (4, 3, 0, 0, 0, 0xFF, 0)
    assert struct.unpack("<BBHBBBB", nmi) == (4, 1, 0, 0, 0, 0xFF, 1)


def test_max_cpus_fits_below_bios_rom():
    assert EBDA_START + mptable_size(MAX_CPUS) <= BIOS_ROM_START
    assert EBDA_START + mptable_size(40) <= 0xA0000  # up to 40 vCPUs stay inside the EBDA proper


@pytest.mark.parametrize("nr,mx", [(0, 1), (2, 1), (1, 255), (300, 300)])
def test_mptable_rejects_bad_counts(nr, mx):
    with pytest.raises(BootError):
        build_mptable(nr, mx)
