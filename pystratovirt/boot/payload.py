"""Host-side decompression of a bzImage's compressed payload (the kernel's vmlinux ELF).

The kernel build compresses vmlinux.bin (+ its relocations) with one of seven codecs; all but
gzip get the uncompressed size appended as a little-endian u32 ("size_append" in
scripts/Makefile.lib), which is the first thing a decoder here checks against. gzip, xz, lz4
(legacy frame) and zstd are decoded here; bzip2, lzma and lzo are identified but left to the
kernel's own decompressor. Every decoder is bounded by a caller-given output limit, and any
failure comes out as :class:`PayloadError` so the loader can fall back to the normal bzImage entry.
"""

from __future__ import annotations

import struct
import zlib

GZIP = "gzip"
XZ = "xz"
LZ4 = "lz4"
ZSTD = "zstd"
BZIP2 = "bzip2"
LZMA = "lzma"
LZO = "lzo"
UNKNOWN = "unknown"

SUPPORTED = (GZIP, XZ, LZ4, ZSTD)

# Checked in order; the lzma ("alone") header has no real magic: properties byte 0x5d + a
# little-endian dictionary size, which the kernel's `lzma -9` makes 0x5d 00 00 ...
_MAGICS = (
    (b"\x1f\x8b", GZIP),
    (b"\xfd7zXZ\x00", XZ),
    (b"\x02\x21\x4c\x18", LZ4),
    (b"\x28\xb5\x2f\xfd", ZSTD),
    (b"BZh", BZIP2),
    (b"\x89LZO", LZO),
    (b"\x5d\x00\x00", LZMA),
)

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20       # each legacy block decompresses to at most 8 MiB
# Feeding compressed input in small steps bounds how far one call can overshoot the output limit.
_STEP = 64 << 10
_ZSTD_STEP = 4 << 10             # zstd RLE blocks expand ~32768x, so zstd gets smaller steps
_ZSTD_MAX_WINDOW = 1 << 30


class PayloadError(Exception):
    """The payload could not be decoded on the host (unsupported codec or corrupt data)."""


def detect_codec(payload: bytes | memoryview) -> str:
    head = bytes(payload[:8])
    for magic, codec in _MAGICS:
        if head.startswith(magic):
            return codec
    return UNKNOWN


def _check_trailing_size(codec: str, out_len: int, trailer: bytes) -> None:
    """Verify the size_append trailer (if any) against the decoded length."""
    if not trailer:
        return
    if len(trailer) != 4:
        raise PayloadError(f"{len(trailer)} stray bytes follow the {codec} stream")
    (expected,) = struct.unpack("<I", trailer)
    if expected != out_len & 0xFFFF_FFFF:
        raise PayloadError(f"the {codec} payload decoded to {out_len} bytes, "
                           f"but its trailer says {expected}")


def _too_big(codec: str, limit: int) -> PayloadError:
    return PayloadError(f"the {codec} payload decompresses to more than {limit} bytes")


def _gunzip(data: memoryview, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out: list[bytes] = []
    total = 0
    pos = 0
    chunk: bytes | memoryview
    while not d.eof:
        if d.unconsumed_tail:
            chunk = d.unconsumed_tail
        elif pos < len(data):
            chunk = data[pos:pos + _STEP]
            pos += len(chunk)
        else:
            raise PayloadError("the gzip stream is truncated")
        piece = d.decompress(chunk, limit + 1 - total)
        total += len(piece)
        out.append(piece)
        if total > limit:
            raise _too_big(GZIP, limit)
    # gzip carries its own size (ISIZE); a kernel build appends nothing, but tolerate a trailer
    _check_trailing_size(GZIP, total, d.unused_data + bytes(data[pos:]))
    return b"".join(out)


def _unxz(data: memoryview, limit: int) -> bytes:
    import lzma  # like the lz4 and zstd decoders, loaded only for an image that needs it

    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    out: list[bytes] = []
    total = 0
    pos = 0
    chunk: bytes | memoryview
    while not d.eof:
        if d.needs_input:
            if pos >= len(data):
                raise PayloadError("the xz stream is truncated")
            chunk = data[pos:pos + _STEP]
            pos += len(chunk)
        else:
            chunk = b""
        piece = d.decompress(chunk, limit + 1 - total)
        total += len(piece)
        out.append(piece)
        if total > limit:
            raise _too_big(XZ, limit)
    _check_trailing_size(XZ, total, d.unused_data + bytes(data[pos:]))
    return b"".join(out)


def _unlz4_legacy(data: memoryview, limit: int) -> bytes:
    """The lz4 "legacy" frame: magic, then [u32 compressed size][block] ... (lz4 -l)."""
    import lz4.block

    out: list[bytes] = []
    total = 0
    pos = 4  # past the magic
    end = len(data)
    while True:
        remaining = end - pos
        if remaining == 0:
            break
        if remaining == 4:
            _check_trailing_size(LZ4, total, bytes(data[pos:]))
            break
        if remaining < 4:
            raise PayloadError("the lz4 stream ends in the middle of a block header")
        (chunk,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if chunk == LZ4_LEGACY_MAGIC:   # concatenated frames
            continue
        if chunk == 0:                  # as the kernel's unlz4: an empty block ends the stream
            break
        if chunk > end - pos:
            raise PayloadError("an lz4 block runs past the end of the payload")
        block = lz4.block.decompress(data[pos:pos + chunk], uncompressed_size=LZ4_LEGACY_BLOCK)
        pos += chunk
        total += len(block)
        out.append(block)
        if total > limit:
            raise _too_big(LZ4, limit)
    if total == 0:
        raise PayloadError("the lz4 stream holds no data")
    return b"".join(out)


def _unzstd(data: memoryview, limit: int) -> bytes:
    import zstandard

    d = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompressobj()
    out: list[bytes] = []
    total = 0
    pos = 0
    while not d.eof:
        if pos >= len(data):
            raise PayloadError("the zstd stream is truncated")
        chunk = data[pos:pos + _ZSTD_STEP]
        pos += len(chunk)
        piece = d.decompress(chunk)
        total += len(piece)
        out.append(piece)
        if total > limit:
            raise _too_big(ZSTD, limit)
    _check_trailing_size(ZSTD, total, d.unused_data + bytes(data[pos:]))
    return b"".join(out)


_DECODERS = {GZIP: _gunzip, XZ: _unxz, LZ4: _unlz4_legacy, ZSTD: _unzstd}


def decompress(payload: bytes | memoryview, limit: int) -> tuple[str, bytes]:
    """(codec, decompressed bytes) of a bzImage payload of at most ``limit`` decompressed bytes."""
    codec = detect_codec(payload)
    decoder = _DECODERS.get(codec)
    if decoder is None:
        if codec == UNKNOWN:
            raise PayloadError("the payload's compression format is not recognised")
        raise PayloadError(f"{codec} payloads are not decompressed on the host")
    try:
        data = decoder(memoryview(payload).cast("B"), limit)
    except PayloadError:
        raise
    except MemoryError:
        raise PayloadError(f"out of host memory decompressing the {codec} payload") from None
    except Exception as exc:  # the codec libraries each raise their own types for corrupt input
        raise PayloadError(f"the {codec} payload is corrupt ({exc})") from None
    if not data:
        raise PayloadError(f"the {codec} payload is empty")
    return codec, data
