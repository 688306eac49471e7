"""Codec detection and bounded decompression of bzImage payloads."""

import os
import struct

import pytest

from boot.bootimages import compress
from pystratovirt.boot.payload import PayloadError, decompress, detect_codec

DATA = os.urandom(4096) * 3 + b"kernel" * 50000 + bytes(100000)


@pytest.mark.parametrize("codec", ["gzip", "xz", "lz4", "zstd"])
def test_roundtrip(codec):
    blob = compress(codec, DATA)
    assert detect_codec(blob) == codec
    assert decompress(blob, limit=len(DATA)) == (codec, DATA)


@pytest.mark.parametrize("codec", ["xz", "lz4", "zstd"])
def test_roundtrip_without_size_trailer(codec):
    assert decompress(compress(codec, DATA, trailer=False), limit=1 << 30) == (codec, DATA)


def test_lz4_multiple_blocks_and_concatenated_frames():
    big = bytes(range(256)) * (40 * 4096)      # 40 MiB: five 8 MiB blocks
    blob = compress("lz4", big)
    assert decompress(blob, limit=1 << 30)[1] == big
    one = compress("lz4", b"a" * 1000, trailer=False)
    two = compress("lz4", b"b" * 1000, trailer=False)
    assert decompress(one + two + struct.pack("<I", 2000), limit=1 << 20)[1] == b"a" * 1000 + b"b" * 1000


@pytest.mark.parametrize("codec", ["xz", "lz4", "zstd"])
def test_wrong_size_trailer(codec):
    blob = compress(codec, DATA, trailer=False) + struct.pack("<I", len(DATA) + 1)
    with pytest.raises(PayloadError, match="trailer"):
        decompress(blob, limit=1 << 30)


@pytest.mark.parametrize("codec", ["gzip", "xz", "lz4", "zstd"])
def test_truncated(codec):
    blob = compress(codec, DATA)
    for cut in (len(blob) // 2, len(blob) - 9, 6):
        with pytest.raises(PayloadError):
            decompress(blob[:cut], limit=1 << 30)


@pytest.mark.parametrize("codec", ["gzip", "xz", "lz4", "zstd"])
def test_output_limit(codec):
    bomb = compress(codec, bytes(20 << 20))
    with pytest.raises(PayloadError, match="more than"):
        decompress(bomb, limit=1 << 20)


@pytest.mark.parametrize("codec", ["gzip", "xz", "lz4", "zstd"])
def test_corrupt(codec):
    blob = bytearray(compress(codec, DATA))
    for i in range(12, len(blob) - 8, max(1, len(blob) // 7)):
        blob[i] ^= 0x5A
    with pytest.raises(PayloadError):
        decompress(bytes(blob), limit=1 << 30)


@pytest.mark.parametrize("codec", ["bzip2", "lzma"])
def test_recognised_but_unsupported(codec):
    blob = compress(codec, DATA)
    assert detect_codec(blob) == codec
    with pytest.raises(PayloadError, match="not decompressed on the host"):
        decompress(blob, limit=1 << 30)


def test_detect_lzo_and_unknown():
    assert detect_codec(b"\x89LZO\0\r\n\x1a\n") == "lzo"
    assert detect_codec(b"garbage!") == "unknown"
    assert detect_codec(b"") == "unknown"
    with pytest.raises(PayloadError, match="not recognised"):
        decompress(b"garbage!", limit=100)
