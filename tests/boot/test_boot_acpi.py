"""The ACPI tables and the AML encoder, parsed back the way an OS reads them (and by iasl, if present)."""

import shutil
import struct
import subprocess

import pytest

from pystratovirt.boot import BootError, acpi, aml
from pystratovirt.boot.acpi import build_acpi_tables, write_acpi_tables
from pystratovirt.boot.bootparams import E820_RESERVED
from pystratovirt.boot.e820 import build_e820
from pystratovirt.boot.mptable import build_mptable, ioapic_id
from pystratovirt.devices import acpi_pm
from pystratovirt.memory.layout import (
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    VIRTIO_IRQ_FIRST,
    VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
)

SERIAL = [(0x3F8, 4)]


def virtio(n):
    return [(VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE, VIRTIO_IRQ_FIRST + i)
            for i in range(n)]


# -- AML encoding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("content,encoded", [
    (0, b"\x01"),
    (62, b"\x3f"),                          # 63 fits the one-byte form
    (63, b"\x41\x04"),                      # 63 + 2 = 65 = 0x41: two bytes
    (0xFFD, b"\x4f\xff"),                   # 0xFFF: the largest two-byte length
    (0xFFE, b"\x81\x00\x01"),               # 0x1001: three bytes
    (0xFFFFC, b"\x8f\xff\xff"),             # 0xFFFFF: the largest three-byte length
    (0xFFFFD, b"\xc1\x00\x00\x01"),         # 0x100001: four bytes
])
def test_pkg_length_forms(content, encoded):
    assert aml.pkg_length(content) == encoded
    assert decode_pkg_length(encoded, 0) == (content + len(encoded), len(encoded))


def test_pkg_length_limits():
    assert len(aml.pkg_length(aml.PKG_LENGTH_MAX - 4)) == 4
    with pytest.raises(aml.AmlError):
        aml.pkg_length(aml.PKG_LENGTH_MAX - 3)
    with pytest.raises(aml.AmlError):
        aml.pkg_length(-1)


def test_name_segments_and_strings():
    assert aml.name_seg("_S5") == b"_S5_"
    assert aml.name_seg("SB") == b"SB__"
    assert aml.name_seg("VR0F") == b"VR0F"
    for bad in ("", "ABCDE", "0ABC", "ab", "A-B"):
        with pytest.raises(aml.AmlError):
            aml.name_seg(bad)
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("_SB.COM1") == b"\x2e_SB_COM1"
    assert aml.name_string("\\A.B.C") == b"\\\x2f\x03A___B___C___"
    assert aml.name_string("") == b"\x00"


@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0x10000, b"\x0c\x00\x00\x01\x00"), (0x1_0000_0000, b"\x0e" + struct.pack("<Q", 1 << 32)),
])
def test_integers(value, encoded):
    assert aml.integer(value) == encoded


def test_integer_range_and_types():
    for bad in (-1, 1 << 64, True, "1"):
        with pytest.raises(aml.AmlError):
            aml.integer(bad)


def test_strings_packages_devices_buffers():
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    with pytest.raises(aml.AmlError):
        aml.string("a\0b")
    assert aml.name("_UID", 3) == b"\x08_UID\x0a\x03"
    assert aml.package([5, 0]) == b"\x12\x05\x02\x0a\x05\x00"
    assert aml.device("VR00", []) == b"\x5b\x82\x05VR00"
    assert aml.scope("\\_SB", []) == b"\x10\x06\\_SB_"
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"


def test_eisa_id():
    assert aml.eisa_id("PNP0501") == 0x0105D041
    assert aml.eisa_id("PNP0A03") == 0x030AD041
    for bad in ("PNP050", "pnp0501", "PNP05G1"):
        with pytest.raises(aml.AmlError):
            aml.eisa_id(bad)


def test_resource_descriptors():
    assert aml.memory32_fixed(0xF0100000, 0x200) == bytes.fromhex("860900" "01" "000010f0" "00020000")
    assert aml.io_port(0x3F8, 8) == bytes.fromhex("47 01 f803 f803 01 08")
    assert aml.extended_interrupt([5]) == bytes.fromhex("89 0600 03 01 05000000")
    assert aml.extended_interrupt([9], edge=False, active_low=True, shared=True) == \
        bytes.fromhex("89 0600 0d 01 09000000")
    tmpl = aml.resource_template([aml.io_port(0x3F8, 8)])
    assert tmpl.endswith(b"\x79\x00") and tmpl[0] == aml.BUFFER_OP
    with pytest.raises(aml.AmlError):
        aml.memory32_fixed(0xFFFF_FF00, 0x200)
    with pytest.raises(aml.AmlError):
        aml.io_port(0xFFFC, 8)


# -- a tiny AML decoder for the subset the DSDT uses ---------------------------------------------------
def decode_pkg_length(data, pos):
    lead = data[pos]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(follow):
        value |= data[pos + 1 + i] << (4 + 8 * i)
    return value, 1 + follow


def decode_name(data, pos):
    prefix = ""
    while data[pos] in (0x5C, 0x5E):
        prefix += chr(data[pos])
        pos += 1
    if data[pos] == 0:
        return prefix, pos + 1
    if data[pos] == 0x2E:
        count, pos = 2, pos + 1
    elif data[pos] == 0x2F:
        count, pos = data[pos + 1], pos + 2
    else:
        count = 1
    segs = [data[pos + 4 * i:pos + 4 * i + 4].decode() for i in range(count)]
    return prefix + ".".join(segs), pos + 4 * count


def decode_term(data, pos):
    """(value, next position); names/scopes/devices become tuples, packages lists."""
    op = data[pos]
    if op in (0x00, 0x01):
        return op, pos + 1
    if op == 0xFF:
        return (1 << 64) - 1, pos + 1
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if op == prefix:
            return int.from_bytes(data[pos + 1:pos + 1 + size], "little"), pos + 1 + size
    if op == 0x0D:
        end = data.index(b"\0", pos + 1)
        return data[pos + 1:end].decode(), end + 1
    if op == 0x08:
        name, p = decode_name(data, pos + 1)
        value, p = decode_term(data, p)
        return ("Name", name, value), p
    if op in (0x10, 0x12, 0x11) or (op == 0x5B and data[pos + 1] == 0x82):
        start = pos + (2 if op == 0x5B else 1)
        length, n = decode_pkg_length(data, start)
        end = start + length
        p = start + n
        if op == 0x12:
            count = data[p]
            p += 1
            items = []
            while p < end:
                item, p = decode_term(data, p)
                items.append(item)
            assert len(items) == count and p == end
            return items, end
        if op == 0x11:
            size, p = decode_term(data, p)
            assert end - p == size
            return bytes(data[p:end]), end
        name, p = decode_name(data, p)
        body = decode_terms(data, p, end)
        return ("Device" if op == 0x5B else "Scope", name, body), end
    raise AssertionError(f"unexpected AML opcode {op:#x} at {pos}")


def decode_terms(data, pos, end):
    out = []
    while pos < end:
        term, pos = decode_term(data, pos)
        out.append(term)
    assert pos == end
    return out


def decode_resources(buf):
    """[(tag, payload)] up to the End Tag, which must be last and checksum 0."""
    out = []
    pos = 0
    while True:
        tag = buf[pos]
        if tag & 0x80:
            length = struct.unpack_from("<H", buf, pos + 1)[0]
            out.append((tag, bytes(buf[pos + 3:pos + 3 + length])))
            pos += 3 + length
        else:
            length = tag & 7
            if tag >> 3 == 0x0F:
                assert buf[pos + 1:] == b"\x00"
                return out
            out.append((tag, bytes(buf[pos + 1:pos + 1 + length])))
            pos += 1 + length


# -- parsing the tables back ----------------------------------------------------------------------------
def table_at(image, base, addr):
    off = addr - base
    sig, length, rev = struct.unpack_from("<4sIB", image, off)
    data = image[off:off + length]
    assert len(data) == length and sum(data) % 256 == 0, f"{sig} checksum"
    assert data[10:16] == b"PYSTRT" and data[16:24] == b"PYSTRATO"
    return sig.decode(), rev, data


def find_rsdp(image, base):
    """Linux's legacy scan: "RSD PTR " on a 16-byte boundary with valid checksums."""
    for off in range(0, len(image) - 36 + 1, 16):
        if image[off:off + 8] == b"RSD PTR " and sum(image[off:off + 20]) % 256 == 0:
            return base + off
    raise AssertionError("no RSDP")


def parse(tables):
    image, base = tables.blob, tables.base
    rsdp_addr = find_rsdp(image, base)
    rsdp = image[rsdp_addr - base:rsdp_addr - base + 36]
    _sig, _ck, oem, rev, rsdt, length, xsdt_addr, _xck = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert (oem, rev, rsdt, length) == (b"PYSTRT", 2, 0, 36) and sum(rsdp) % 256 == 0
    sig, rev, xsdt = table_at(image, base, xsdt_addr)
    assert (sig, rev) == ("XSDT", 1)
    out = {"RSDP": rsdp_addr}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        sig, rev, data = table_at(image, base, addr)
        out[sig] = (rev, data)
    fadt = out["FACP"][1]
    dsdt_addr = struct.unpack_from("<I", fadt, 40)[0]
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt_addr
    out["DSDT"] = table_at(image, base, dsdt_addr)[1:]
    return out


def madt_entries(madt):
    entries = []
    pos = 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        entries.append((kind, madt[pos:pos + length]))
        pos += length
    assert pos == len(madt)
    return entries


@pytest.mark.parametrize("nr,mx", [(1, 1), (2, 2), (2, 4), (1, 254), (254, 254)])
def test_tables_roundtrip(nr, mx):
    t = parse(build_acpi_tables(nr_cpus=nr, max_cpus=mx, virtio_devices=virtio(3),
                                serial_ports=SERIAL))
    assert sorted(t) == ["APIC", "DSDT", "FACP", "RSDP"]
    assert t["RSDP"] == acpi.RSDP_ADDR == 0xF0000

    rev, fadt = t["FACP"]
    assert rev == 6 and len(fadt) == 276 and fadt[131] == 3
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & acpi.FADT_HW_REDUCED_ACPI and flags & acpi.FADT_RESET_REG_SUP
    assert struct.unpack_from("<H", fadt, 109)[0] == acpi.IAPC_VGA_NOT_PRESENT | acpi.IAPC_CMOS_RTC_NOT_PRESENT
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x64) and fadt[128] == 0xFE
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, ACPI_SLEEP_CONTROL_PORT)
    assert struct.unpack_from("<BBBBQ", fadt, 256) == (1, 8, 0, 1, ACPI_SLEEP_STATUS_PORT)
    assert fadt[56:88] == bytes(32) and fadt[148:244] == bytes(96)  # no PM1/PM2/timer/GPE blocks

    rev, madt = t["APIC"]
    assert rev == 5
    assert struct.unpack_from("<II", madt, 36) == (LAPIC_ADDR, 1)
    entries = madt_entries(madt)
    assert [k for k, _ in entries] == [0] * mx + [1, 4]
    for i, (_, e) in enumerate(entries[:mx]):
        assert struct.unpack("<BBBBI", e) == (0, 8, i, i, 1 if i < nr else 2)
    _, _, ioapic_id, _, addr, gsi_base = struct.unpack("<BBBBII", entries[mx][1])
    assert (addr, gsi_base) == (IOAPIC_ADDR, 0)
    assert ioapic_id not in range(mx) and ioapic_id < 0xFF
    assert struct.unpack("<BBBHB", entries[mx + 1][1]) == (4, 6, 0xFF, 0, 1)


def test_ioapic_id_agrees_with_the_mp_table():
    for mx in (1, 2, 8, 200):
        mp = build_mptable(1, mx)
        ioapic_entry = mp.index(bytes([2, mx + 1, 0x11, 1]))  # type, id, version, enabled
        assert ioapic_entry > 0 and ioapic_id(mx) == mx + 1
    assert ioapic_id(254) == 254  # never the broadcast id 0xFF


def test_dsdt_contents():
    t = parse(build_acpi_tables(nr_cpus=1, max_cpus=1, virtio_devices=virtio(16), serial_ports=SERIAL))
    rev, dsdt = t["DSDT"]
    assert rev == 2
    terms = decode_terms(dsdt, 36, len(dsdt))
    assert terms[0] == ("Name", "\\_S5_", [acpi.SLP_TYP_S5, acpi.SLP_TYP_S5, 0, 0])
    kind, scope_name, devices = terms[1]
    assert (kind, scope_name, len(terms)) == ("Scope", "\\_SB_", 2)
    assert [d[1] for d in devices] == ["COM1"] + [f"VR{i:02X}" for i in range(16)]

    com1 = {n[1]: n[2] for n in devices[0][2]}
    assert com1["_HID"] == aml.eisa_id("PNP0501") and com1["_UID"] == 1
    io, irq = decode_resources(com1["_CRS"])
    assert io == (0x47, bytes.fromhex("01f803f8030108"))
    assert irq == (0x89, bytes.fromhex("030104000000"))

    for i, dev in enumerate(devices[1:]):
        names = {n[1]: n[2] for n in dev[2]}
        assert list(names) == ["_HID", "_UID", "_CCA", "_CRS"]
        assert (names["_HID"], names["_UID"], names["_CCA"]) == ("LNRO0005", i, 1)
        (mtag, mem), (itag, irq) = decode_resources(names["_CRS"])
        assert mtag == 0x86 and struct.unpack("<BII", mem) == (1, VIRTIO_MMIO_BASE + 0x200 * i, 0x200)
        # consumer | edge, active high, exclusive; one interrupt: the device's GSI
        assert itag == 0x89 and struct.unpack("<BBI", irq) == (0x03, 1, VIRTIO_IRQ_FIRST + i)


def test_dsdt_without_devices_has_only_s5():
    t = parse(build_acpi_tables(nr_cpus=1, max_cpus=1))
    terms = decode_terms(t["DSDT"][1], 36, len(t["DSDT"][1]))
    assert terms == [("Name", "\\_S5_", [5, 5, 0, 0])]


def test_s5_value_matches_the_sleep_device():
    assert acpi.SLP_TYP_S5 == acpi_pm.SLP_TYP_S5
    assert (acpi.SLP_EN, acpi.WAK_STS, acpi.SLP_TYP_SHIFT) == (acpi_pm.SLP_EN, acpi_pm.WAK_STS,
                                                               acpi_pm.SLP_TYP_SHIFT)
    assert acpi_pm.AcpiPm.BASE == ACPI_SLEEP_CONTROL_PORT
    assert acpi_pm.AcpiPm.BASE + acpi_pm.STATUS_OFFSET == ACPI_SLEEP_STATUS_PORT


@pytest.mark.parametrize("mx,devices", [(1, 0), (2, 0), (254, 16), (254, 256)])
def test_sizes_fit_the_bios_area(mx, devices):
    t = build_acpi_tables(nr_cpus=1, max_cpus=mx, virtio_devices=virtio(devices), serial_ports=SERIAL)
    assert t.base == 0xF0000 and t.end <= 0x100000
    assert t.tables["APIC"][1] == 44 + 8 * mx + 12 + 6
    assert t.tables["FACP"][1] == 276


def test_tables_lie_in_e820_reserved_memory(mem):
    t = build_acpi_tables(nr_cpus=1, max_cpus=254, virtio_devices=virtio(16), serial_ports=SERIAL)
    e820 = build_e820(mem.regions)
    assert any(e.type == E820_RESERVED and e.addr <= t.base and t.end <= e.end for e in e820)


def test_write_acpi_tables(mem):
    rsdp = write_acpi_tables(mem, nr_cpus=2, max_cpus=4, virtio_devices=virtio(2), serial_ports=SERIAL)
    assert rsdp == 0xF0000
    expected = build_acpi_tables(nr_cpus=2, max_cpus=4, virtio_devices=virtio(2), serial_ports=SERIAL)
    assert mem.read(rsdp, len(expected.blob)) == expected.blob
    # Linux's legacy scan of the BIOS area 0xE0000..0xFFFFF finds it
    area = mem.read(0xE0000, 0x20000)
    assert find_rsdp(area, 0xE0000) == rsdp


@pytest.mark.parametrize("nr,mx", [(0, 1), (2, 1), (1, 255), (1.0, 2)])
def test_rejects_bad_cpu_counts(nr, mx):
    with pytest.raises(BootError):
        build_acpi_tables(nr_cpus=nr, max_cpus=mx)


def test_rejects_what_does_not_fit():
    with pytest.raises(BootError):
        build_acpi_tables(nr_cpus=1, max_cpus=1, virtio_devices=virtio(257))
    with pytest.raises(BootError):
        build_acpi_tables(nr_cpus=1, max_cpus=1, virtio_devices=[(0xFFFF_FF00, 0x200, 5)])
    with pytest.raises(BootError):
        build_acpi_tables(nr_cpus=1, max_cpus=254, virtio_devices=virtio(16), limit=0xF0400)


# -- iasl -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (Debian package acpica-tools) not installed")
@pytest.mark.parametrize("nr,mx,devices", [(1, 1, 0), (2, 4, 3), (8, 254, 16)])
def test_iasl_disassembles_and_recompiles(tmp_path, nr, mx, devices):
    t = build_acpi_tables(nr_cpus=nr, max_cpus=mx, virtio_devices=virtio(devices), serial_ports=SERIAL)
    # iasl cannot take an RSDP alone (it has no table header); the parse above checks it.
    for sig in ("XSDT", "FACP", "APIC", "DSDT"):
        addr, length = t.tables[sig]
        dat = tmp_path / f"{sig.lower()}.dat"
        dat.write_bytes(t.blob[addr - t.base:addr - t.base + length])
        run = subprocess.run(["iasl", "-d", dat.name], cwd=tmp_path, capture_output=True, text=True)
        out = run.stdout + run.stderr
        dsl = tmp_path / f"{sig.lower()}.dsl"
        assert run.returncode == 0 and dsl.exists(), out
        text = dsl.read_text()
        for word in ("error", "warning", "incorrect"):
            assert word not in out.lower() and word not in text.lower(), (sig, out, text)
        # The disassembly compiles back without errors or warnings.
        run = subprocess.run(["iasl", "-p", str(tmp_path / f"re_{sig}"), dsl.name], cwd=tmp_path,
                             capture_output=True, text=True)
        assert run.returncode == 0 and "0 Errors, 0 Warnings" in run.stdout + run.stderr, \
            run.stdout + run.stderr
        if sig == "DSDT":
            assert text.count('Name (_HID, "LNRO0005")') == devices
            assert 'EisaId ("PNP0501")' in text and "Name (\\_S5, Package (0x04)" in text
        if sig == "APIC":
            assert text.count("[Processor Local APIC]") == mx and "[I/O APIC]" in text
