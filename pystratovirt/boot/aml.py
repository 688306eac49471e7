"""A small encoder for ACPI Machine Language (AML, ACPI 6.x chapter 20) and ACPI resource
descriptors (chapter 6.4): just the terms the micro-VM's DSDT needs.

Owns the byte encoding of: PkgLength, NameSeg/NameString, integer constants (ZeroOp, OneOp,
OnesOp, Byte/Word/DWord/QWordPrefix), strings, Name, Scope, Device, Package and Buffer terms,
EISA ids, and ResourceTemplate buffers holding Memory32Fixed, I/O port and Extended Interrupt
descriptors closed by an End Tag. Every function returns ``bytes``; the caller concatenates them.
Nothing here knows about the machine: :mod:`.acpi` decides what the DSDT says.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

# -- opcodes and prefixes (ACPI 6.x section 20.3) ----------------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82                 # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C                 # '\'
PARENT_PREFIX_CHAR = 0x5E        # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

# A PkgLength counts itself; with n follow bytes it can say at most 2**(4 + 8 n) - 1.
PKG_LENGTH_MAX = (1 << 28) - 1

_NAME_SEG_RE = re.compile(r"[A-Z_][A-Z0-9_]{0,3}\Z")


class AmlError(ValueError):
    """A value that has no AML encoding (bad name, integer out of range, too long a package)."""


# -- package length ---------------------------------------------------------------------------------
def pkg_length(content_len: int) -> bytes:
    """The PkgLength for a term whose body after the PkgLength is ``content_len`` bytes long.

    The encoded length includes the PkgLength bytes themselves, which is why the number of bytes
    is chosen first: one byte says up to 63 in bits 0-5; otherwise bits 6-7 give the count n of
    following bytes, bits 0-3 the low nibble, and the n bytes the rest, least significant first.
    """
    if content_len < 0:
        raise AmlError(f"negative package length {content_len}")
    if content_len + 1 < 1 << 6:
        return bytes([content_len + 1])
    for follow in (1, 2, 3):
        total = content_len + 1 + follow
        if total < 1 << (4 + 8 * follow):
            out = [(follow << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(follow):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise AmlError(f"package of {content_len} bytes is longer than AML can say ({PKG_LENGTH_MAX})")


def _with_pkg_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


# -- names ------------------------------------------------------------------------------------------
def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL compilers do."""
    if not isinstance(seg, str) or not _NAME_SEG_RE.match(seg):
        raise AmlError(f"{seg!r} is not an ACPI name segment (1-4 of A-Z, 0-9, _; no leading digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional '\\' or '^' prefixes, then dot-separated segments ('' = NullName)."""
    if not isinstance(path, str):
        raise AmlError(f"{path!r} is not a name")
    prefix = b""
    i = 0
    if path.startswith("\\"):
        prefix, i = bytes([ROOT_CHAR]), 1
    else:
        while i < len(path) and path[i] == "^":
            i += 1
        prefix = bytes([PARENT_PREFIX_CHAR]) * i
    rest = path[i:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"name {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# -- data objects -----------------------------------------------------------------------------------
def integer(value: int) -> bytes:
    """The shortest AML encoding of an unsigned 64-bit integer constant."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmlError(f"{value!r} is not an integer")
    if value < 0 or value > 0xFFFF_FFFF_FFFF_FFFF:
        raise AmlError(f"integer {value} does not fit in 64 bits")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    # OnesOp means all ones only for 64-bit integers (DSDT revision >= 2); spell it out instead.
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A String constant: ASCII 0x01..0x7F, NUL-terminated."""
    raw = text.encode("ascii")
    if b"\0" in raw or any(b > 0x7F for b in raw):
        raise AmlError(f"{text!r} cannot be an AML string")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> int:
    """The 32-bit compressed EISA id of "PNPxxxx"-style ids, as the ASL EISAID() macro makes it.

    Three letters of 5 bits each ('A' = 1) and four hex digits, stored big-endian in the byte
    sequence the integer occupies in memory.
    """
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise AmlError(f"{text!r} is not an EISA id (three capitals, four hex digits)")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise AmlError(f"{text!r} is not an EISA id (three capitals, four hex digits)") from None
    c1, c2, c3 = (ord(c) - 0x40 for c in text[:3])
    vendor = (c1 << 10) | (c2 << 5) | c3
    raw = struct.pack(">HH", vendor, product)
    return struct.unpack("<I", raw)[0]


def _data(value) -> bytes:
    """An already-encoded term (bytes) as is; an int as an integer; a str as a String."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return string(value)
    return integer(value)


def name(path: str, value) -> bytes:
    """DefName: ``Name (path, value)``."""
    return bytes([NAME_OP]) + name_string(path) + _data(value)


def package(elements: Iterable) -> bytes:
    """DefPackage with NumElements = the number of elements given (at most 255)."""
    items = [_data(e) for e in elements]
    if len(items) > 255:
        raise AmlError("a Package holds at most 255 elements (VarPackage is not supported)")
    return _with_pkg_length(bytes([PACKAGE_OP]), bytes([len(items)]) + b"".join(items))


def buffer(data: bytes) -> bytes:
    """DefBuffer initialised with ``data`` (BufferSize = its length)."""
    data = bytes(data)
    return _with_pkg_length(bytes([BUFFER_OP]), integer(len(data)) + data)


def scope(path: str, terms: Iterable[bytes]) -> bytes:
    """DefScope: ``Scope (path) { terms }``."""
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, terms: Iterable[bytes]) -> bytes:
    """DefDevice: ``Device (path) { terms }``."""
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


# -- resource descriptors (section 6.4) -------------------------------------------------------------
END_TAG = 0x79                   # small item 0xF, length 1
IO_PORT_TAG = 0x47               # small item 0x8, length 7
MEMORY32_FIXED_TAG = 0x86        # large item 0x06
EXTENDED_IRQ_TAG = 0x89          # large item 0x09

IO_DECODE_16 = 1 << 0
MEM_READ_WRITE = 1 << 0
IRQ_CONSUMER = 1 << 0
IRQ_EDGE = 1 << 1
IRQ_ACTIVE_LOW = 1 << 2
IRQ_SHARED = 1 << 3
IRQ_WAKE_CAPABLE = 1 << 4


def memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite/ReadOnly, base, size)."""
    if not (0 <= base <= 0xFFFF_FFFF and 0 <= size <= 0xFFFF_FFFF and base + size <= 1 << 32):
        raise AmlError(f"memory range [{base:#x}, +{size:#x}) is not 32-bit")
    return struct.pack("<BHBII", MEMORY32_FIXED_TAG, 9, MEM_READ_WRITE if writable else 0, base, size)


def io_port(base: int, length: int, alignment: int = 1) -> bytes:
    """IO (Decode16, base, base, alignment, length): a fixed range of I/O ports."""
    if not (0 <= base <= 0xFFFF and 0 < length <= 0xFF and base + length <= 0x1_0000
            and 0 <= alignment <= 0xFF):
        raise AmlError(f"I/O range [{base:#x}, +{length:#x}) cannot be described")
    return struct.pack("<BBHHBB", IO_PORT_TAG, IO_DECODE_16, base, base, alignment, length)


def extended_interrupt(gsis: Iterable[int], *, edge: bool = True, active_low: bool = False,
                       shared: bool = False, wake: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}."""
    gsis = list(gsis)
    if not 1 <= len(gsis) <= 255 or any(not 0 <= g <= 0xFFFF_FFFF for g in gsis):
        raise AmlError(f"interrupt list {gsis!r} cannot be described")
    flags = (IRQ_CONSUMER | (IRQ_EDGE if edge else 0) | (IRQ_ACTIVE_LOW if active_low else 0)
             | (IRQ_SHARED if shared else 0) | (IRQ_WAKE_CAPABLE if wake else 0))
    return (struct.pack("<BHBB", EXTENDED_IRQ_TAG, 2 + 4 * len(gsis), flags, len(gsis))
            + struct.pack(f"<{len(gsis)}I", *gsis))


def resource_template(descriptors: Iterable[bytes]) -> bytes:
    """ResourceTemplate () { descriptors }: a Buffer ending in an End Tag with checksum 0.

    A zero checksum means "treat as valid" (section 6.4.2.9), which is what ASL compilers emit.
    """
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
