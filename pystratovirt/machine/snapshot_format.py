"""The snapshot's state file: its byte layout, the checksum, and the typed value encoding inside.

Owns :class:`SnapshotError` and the state file's format (``docs/snapshot.md`` describes it for
people): a header (magic ``PYSVSNAP``, format version, payload length), the payload, and a
SHA-256 of everything before it. The payload is one value in a small self-describing binary
encoding (None, booleans, integers, floats, bytes, strings, lists, string-keyed maps, enum
members and records); a record is a frozen dataclass written as its type name and its fields by
name, and read back only as one of the types a :class:`Codec` was built for, with every field
checked against the dataclass's type annotations. So whatever the file holds, reading it gives
either a value of exactly the expected shape or one :class:`SnapshotError` sentence -- never a
``struct.error``, an ``IndexError`` or a half-built value.

It knows nothing of what the values mean (that is :mod:`.snapshot`), so it can be fuzzed on its
own (``tests/machine/test_snapshot_format.py``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import os
import struct
import types
import typing
from collections.abc import Mapping
from typing import Any, Generic, TypeVar, Union

from ..errors import PyStratoVirtError, printable

MAGIC = b"PYSVSNAP"
# 1: the first format. 2: the rng and console windows hold RngState/ConsoleState (their held
# chains given back), where 1 had a bare VirtioState that lost them.
FORMAT_VERSION = 2
_HEADER = struct.Struct("<8sIIQ")  # magic, format version, flags (0), payload length
_DIGEST = 32                      # SHA-256
MAX_STATE_FILE = 256 << 20        # a state file is kilobytes; refuse to read anything absurd
MAX_DEPTH = 32                    # records nest a handful of levels deep
MAX_INT_BYTES = 16                # integers up to 2**127 (addresses and feature masks are 64-bit)

# Value tags.
_NONE, _TRUE, _FALSE, _INT, _FLOAT, _BYTES, _STR, _LIST, _MAP, _RECORD, _ENUM = b"NTFifbsldre"
_F64 = struct.Struct("<d")


class SnapshotError(PyStratoVirtError):
    """A snapshot cannot be written, read or used; ``desc`` is one sentence naming what is wrong."""


class _Malformed(Exception):
    """Raised inside the decoder; turned into one SnapshotError by :meth:`Codec.decode`."""


# -- encoding ---------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode(value: object, out: bytearray) -> None:
    if value is None:
        out.append(_NONE)
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif isinstance(value, enum.Enum):
        out.append(_ENUM)
        _encode(type(value).__name__, out)
        _encode(value.value, out)
    elif isinstance(value, int):
        out.append(_INT)
        zigzag = value << 1 if value >= 0 else ((-value) << 1) - 1
        out += _varint(zigzag)
    elif isinstance(value, float):
        out.append(_FLOAT)
        out += _F64.pack(value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out.append(_BYTES)
        out += _varint(len(data))
        out += data
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out.append(_STR)
        out += _varint(len(data))
        out += data
    elif isinstance(value, (list, tuple)):
        out.append(_LIST)
        out += _varint(len(value))
        for item in value:
            _encode(item, out)
    elif isinstance(value, Mapping):
        out.append(_MAP)
        out += _varint(len(value))
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"snapshot maps have string keys, not {key!r}")
            _encode(key, out)
            _encode(item, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        out.append(_RECORD)
        _encode(type(value).__name__, out)
        out += _varint(len(fields))
        for f in fields:
            _encode(f.name, out)
            _encode(getattr(value, f.name), out)
    else:
        raise TypeError(f"no snapshot encoding for {type(value).__name__}")


# -- decoding (untyped) -------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Malformed(f"it ends inside a value at byte {self.pos}")
        piece = self.data[self.pos:self.pos + n]
        self.pos += n
        return piece

    def varint(self, limit_bytes: int = 10) -> int:
        shift = result = 0
        for _ in range(limit_bytes):
            byte = self.take(1)[0]
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
        raise _Malformed(f"a number at byte {self.pos} is too long")

    def length(self) -> int:
        n = self.varint()
        if n > len(self.data) - self.pos:
            raise _Malformed(f"a length of {n} at byte {self.pos} runs past the end")
        return n


class _Record:
    """A record as read, before it is checked against its type."""

    __slots__ = ("name", "fields")

    def __init__(self, name: str, fields: dict[str, object]):
        self.name = name
        self.fields = fields


class _EnumValue:
    __slots__ = ("name", "value")

    def __init__(self, name: str, value: object):
        self.name = name
        self.value = value


def _decode(r: _Reader, depth: int) -> object:
    if depth > MAX_DEPTH:
        raise _Malformed("values are nested too deeply")
    tag = r.take(1)[0]
    if tag == _NONE:
        return None
    if tag == _TRUE:
        return True
    if tag == _FALSE:
        return False
    if tag == _INT:
        zigzag = r.varint(MAX_INT_BYTES * 8 // 7 + 1)
        return zigzag >> 1 if not zigzag & 1 else -((zigzag + 1) >> 1)
    if tag == _FLOAT:
        return _F64.unpack(r.take(8))[0]
    if tag == _BYTES:
        return r.take(r.length())
    if tag == _STR:
        raw = r.take(r.length())
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise _Malformed(f"a string before byte {r.pos} is not UTF-8") from None
    if tag == _LIST:
        return [_decode(r, depth + 1) for _ in range(r.length())]
    if tag == _MAP:
        items: dict[str, object] = {}
        for _ in range(r.length()):
            key = _decode(r, depth + 1)
            if not isinstance(key, str):
                raise _Malformed(f"a map key before byte {r.pos} is not a string")
            if key in items:
                raise _Malformed(f"map key '{key}' appears twice")
            items[key] = _decode(r, depth + 1)
        return items
    if tag == _RECORD:
        name = _decode(r, depth + 1)
        if not isinstance(name, str):
            raise _Malformed(f"a record name before byte {r.pos} is not a string")
        fields: dict[str, object] = {}
        for _ in range(r.length()):
            key = _decode(r, depth + 1)
            if not isinstance(key, str):
                raise _Malformed(f"a field name of record {name} is not a string")
            if key in fields:
                raise _Malformed(f"field '{key}' of record {name} appears twice")
            fields[key] = _decode(r, depth + 1)
        return _Record(name, fields)
    if tag == _ENUM:
        name = _decode(r, depth + 1)
        if not isinstance(name, str):
            raise _Malformed(f"an enum name before byte {r.pos} is not a string")
        return _EnumValue(name, _decode(r, depth + 1))
    raise _Malformed(f"byte {r.pos - 1} has an unknown value tag {tag:#x}")


# -- typed values ------------------------------------------------------------------------------------
_Root = TypeVar("_Root")


class Codec(Generic[_Root]):
    """Encodes values of the record type ``root`` (a frozen dataclass) and decodes them back,
    accepting only the dataclasses and enums reachable from ``root``'s field annotations.

    Type forms (``int | None``, ``tuple[X, ...]``) are not all ``type`` objects, so the walk over
    them below takes them as Any."""

    def __init__(self, root: type[_Root]):
        self.root = root
        self._records: dict[str, type] = {}
        self._enums: dict[str, type[enum.Enum]] = {}
        self._hints: dict[type, dict[str, Any]] = {}
        self._collect(root)

    def _collect(self, tp: Any) -> None:
        origin = typing.get_origin(tp)
        if origin is not None:
            for arg in typing.get_args(tp):
                if arg is not Ellipsis:
                    self._collect(arg)
            return
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            self._enums[tp.__name__] = tp
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            known = self._records.get(tp.__name__)
            if known is tp:
                return
            if known is not None:
                raise TypeError(f"two record types are named {tp.__name__}")
            self._records[tp.__name__] = tp
            self._hints[tp] = typing.get_type_hints(tp)
            for f in dataclasses.fields(tp):
                self._collect(self._hints[tp][f.name])

    @property
    def record_types(self) -> list[type]:
        return list(self._records.values())

    def encode(self, value: object) -> bytes:
        if not isinstance(value, self.root):
            raise TypeError(f"expected a {self.root.__name__}, not {type(value).__name__}")
        out = bytearray()
        _encode(value, out)
        return bytes(out)

    def decode(self, data: bytes, what: str = "the snapshot's state") -> _Root:
        """The ``root`` value in ``data``; SnapshotError("<what> is malformed: ...") otherwise."""
        try:
            r = _Reader(bytes(data))
            raw = _decode(r, 0)
            if r.pos != len(r.data):
                raise _Malformed(f"{len(r.data) - r.pos} bytes follow the value")
            value: _Root = self._typed(raw, self.root, self.root.__name__)
            return value
        except _Malformed as exc:
            raise SnapshotError(f"{_capital(what)} is malformed: {printable(str(exc))}.") from None
        except RecursionError:
            raise SnapshotError(f"{_capital(what)} is malformed: values are nested too deeply.") from None

    def _typed(self, raw: object, tp: Any, where: str) -> Any:
        if tp is Any or tp is object:
            raise _Malformed(f"{where} has no declared type")
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            return self._union(raw, typing.get_args(tp), where)
        if origin is tuple or origin is list:
            args = typing.get_args(tp)
            if not isinstance(raw, list):
                raise _Malformed(f"{where} is not a list")
            if origin is list or (len(args) == 2 and args[1] is Ellipsis):
                items = [self._typed(item, args[0], f"{where}[{i}]") for i, item in enumerate(raw)]
            else:
                if len(raw) != len(args):
                    raise _Malformed(f"{where} has {len(raw)} items, not {len(args)}")
                items = [self._typed(item, arg, f"{where}[{i}]")
                         for i, (item, arg) in enumerate(zip(raw, args, strict=True))]
            return items if origin is list else tuple(items)
        if origin in (dict, Mapping) or tp is dict:
            key_tp, value_tp = typing.get_args(tp) or (str, Any)
            if not isinstance(raw, dict) or key_tp is not str:
                raise _Malformed(f"{where} is not a map")
            return {k: self._typed(v, value_tp, f"{where}[{k!r}]") for k, v in raw.items()}
        if tp is type(None):
            if raw is not None:
                raise _Malformed(f"{where} is not None")
            return None
        if tp is bool:
            if not isinstance(raw, bool):
                raise _Malformed(f"{where} is not a boolean")
            return raw
        if tp is int:
            if not isinstance(raw, int) or isinstance(raw, bool):
                raise _Malformed(f"{where} is not an integer")
            return raw
        if tp is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
                raise _Malformed(f"{where} is not a finite number")
            return float(raw)
        if tp is str:
            if not isinstance(raw, str):
                raise _Malformed(f"{where} is not a string")
            return raw
        if tp is bytes:
            if not isinstance(raw, bytes):
                raise _Malformed(f"{where} is not a byte string")
            return raw
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            if not isinstance(raw, _EnumValue) or raw.name != tp.__name__:
                raise _Malformed(f"{where} is not a {tp.__name__}")
            try:
                return tp(raw.value)
            except (ValueError, TypeError):
                raise _Malformed(f"{where} has no {tp.__name__} {raw.value!r}") from None
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self._record(raw, tp, where)
        raise _Malformed(f"{where} has a type the format cannot hold ({tp!r})")

    def _union(self, raw: object, options: tuple[Any, ...], where: str) -> Any:
        if raw is None and type(None) in options:
            return None
        if isinstance(raw, _Record):
            # A record says its own type; it must be one of the alternatives.
            for option in options:
                if isinstance(option, type) and dataclasses.is_dataclass(option) and option.__name__ == raw.name:
                    return self._record(raw, option, where)
            raise _Malformed(f"{where} is a {raw.name}, which cannot stand there")
        failures = []
        for option in options:
            if option is type(None):
                continue
            try:
                return self._typed(raw, option, where)
            except _Malformed as exc:
                failures.append(str(exc))
        raise _Malformed(failures[0] if len(failures) == 1 else f"{where} has none of its possible types")

    def _record(self, raw: object, tp: type, where: str) -> Any:
        if not isinstance(raw, _Record):
            raise _Malformed(f"{where} is not a {tp.__name__} record")
        if raw.name != tp.__name__ or self._records.get(raw.name) is not tp:
            raise _Malformed(f"{where} is a {raw.name} record, not {tp.__name__}")
        hints = self._hints[tp]
        names = [f.name for f in dataclasses.fields(tp)]
        missing = [n for n in names if n not in raw.fields]
        if missing:
            raise _Malformed(f"{where} lacks field '{missing[0]}'")
        extra = [n for n in raw.fields if n not in hints]
        if extra:
            raise _Malformed(f"{where} has an unknown field '{extra[0]}'")
        values = {n: self._typed(raw.fields[n], hints[n], f"{where}.{n}") for n in names}
        try:
            return tp(**values)
        except (ValueError, TypeError) as exc:
            raise _Malformed(f"{where} is invalid ({exc})") from None


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


# -- the state file ------------------------------------------------------------------------------------
def pack_state(codec: Codec[_Root], value: _Root) -> bytes:
    """The state file's bytes for ``value``: header, payload, SHA-256."""
    payload = codec.encode(value)
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def unpack_state(codec: Codec[_Root], data: bytes, name: str = "state file") -> _Root:
    """The value in a state file's bytes, or SnapshotError naming what is wrong with them: not a
    snapshot, a newer format, truncated, trailing data, a checksum mismatch, malformed."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        if MAGIC.startswith(data[:len(MAGIC)]) and len(data) < _HEADER.size:
            raise SnapshotError(f"The snapshot's {name} is truncated: it has {len(data)} bytes.")
        raise SnapshotError(f"The snapshot's {name} is not a pystratovirt snapshot (wrong magic number).")
    if len(data) < _HEADER.size:
        raise SnapshotError(f"The snapshot's {name} is truncated: it has {len(data)} bytes.")
    _magic, version, flags, length = _HEADER.unpack_from(data)
    if version > FORMAT_VERSION:
        raise SnapshotError(f"The snapshot's {name} has format version {version}, newer than this "
                            f"pystratovirt reads ({FORMAT_VERSION}); use the version that wrote it.")
    if version < 1:
        raise SnapshotError(f"The snapshot's {name} has format version {version}, which never existed.")
    if version < FORMAT_VERSION:
        raise SnapshotError(f"The snapshot's {name} has format version {version}, older than this "
                            f"pystratovirt reads ({FORMAT_VERSION}); use the version that wrote it.")
    expected = _HEADER.size + length + _DIGEST
    if len(data) < expected:
        raise SnapshotError(f"The snapshot's {name} is truncated: it has {len(data)} bytes, its header "
                            f"says {expected}.")
    if len(data) > expected:
        raise SnapshotError(f"The snapshot's {name} has {len(data) - expected} bytes of unexpected data "
                            "after its end.")
    body = data[:_HEADER.size + length]
    if hashlib.sha256(body).digest() != data[_HEADER.size + length:]:
        raise SnapshotError(f"The snapshot's {name} is corrupted: its checksum does not match.")
    if flags:
        raise SnapshotError(f"The snapshot's {name} uses flags {flags:#x} this pystratovirt does not know.")
    return codec.decode(data[_HEADER.size:_HEADER.size + length], f"the snapshot's {name}")


def write_state_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and make it durable (fsync)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state_file(path: str) -> bytes:
    """The state file's bytes, or SnapshotError when it is missing, unreadable or absurdly big."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"There is no snapshot state file at '{path}'.") from None
    except OSError as exc:
        raise SnapshotError(f"Cannot open the snapshot state file '{path}': {exc.strerror}.") from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_STATE_FILE:
            raise SnapshotError(f"The snapshot state file '{path}' is {size} bytes, far too big to be one.")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise SnapshotError(f"Cannot read the snapshot state file '{path}': {exc.strerror}.") from None
    finally:
        os.close(fd)
