"""Scalar value syntax shared by the command line and the JSON file.

Owns: ``key=value[,key=value...]`` sub-option lists (StratoVirt's ``CmdParser``), booleans
(``on|off|true|false|yes|no``), unsigned integers, memory sizes (``256M``, ``1G`` or a bare number:
bytes that must be 1 MiB aligned in the 0.x dialect, MiB in 2.x) and the length limits, which — like StratoVirt's Rust
``str::len`` — count UTF-8 bytes, not characters.
"""

from __future__ import annotations

import re

from ..machine.vmconfig import MAX_MEM_SIZE, MIN_MEM_SIZE, Dialect
from ..memory.layout import GiB, MiB
from .errors import ConfigError

_TRUE = ("on", "true", "yes")
_FALSE = ("off", "false", "no")
_UINT = re.compile(r"[0-9]+")
_SIZE = re.compile(r"([0-9]+)([mMgG]?)")

MEM_RANGE_ERROR = "Size of memory should be less than 512G and more than 128M."


def byte_len(text: str) -> int:
    """Length in UTF-8 bytes; lone surrogates (from undecodable argv bytes) count as 3, never raise."""
    return len(text.encode("utf-8", "surrogatepass"))


def check_len(text: str, what: str, limit: int) -> None:
    if byte_len(text) > limit:
        raise ConfigError(f"Input {what} string's length must be no more than {limit}.")


def check_not_empty(text: str, what: str) -> None:
    if not text:
        raise ConfigError(f"The {what} must not be empty.")


def parse_kv(text: str, option: str, keys: tuple[str, ...], flags: tuple[str, ...] = ()) -> dict[str, str]:
    """Split ``a=1,b=2,word`` into ``{"a": "1", "b": "2", "": "word"}``; "" in ``keys`` allows one bare word.

    StratoVirt's rules: no leading/trailing comma, no item that starts or ends with '=', the value
    is everything after the first '=', an unknown key (or an unexpected bare word) is
    ``Invalid parameter '<k>'``, and a key may appear only once. A bare word named in ``flags``
    (2.x's ``server``, ``nowait``) is that key with the value "" and takes no value.
    """
    if text.startswith(",") or text.endswith(","):
        raise ConfigError(f"Invalid parameter '{text}'")
    result: dict[str, str] = {}
    for item in text.split(","):
        if item.startswith("=") or item.endswith("="):
            raise ConfigError(f"Invalid parameter '{item}'")
        key, sep, value = item.partition("=")
        if key in flags:
            if sep:
                raise ConfigError(f"No parameter needed for {key}")
        elif not sep:
            key, value = "", item
        if key not in keys and key not in flags:
            raise ConfigError(f"Invalid parameter '{key if sep else item}'")
        if key in result:
            if not key:
                raise ConfigError(f"Only one value without a key is allowed in {option}, but '{item}' is a second one.")
            raise ConfigError(f"Input field '{key}' in {option} is offered more than once.")
        result[key] = value
    return result


def parse_bool(raw: str, key: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"Unable to parse '{raw}' for '{key}'; expected on, off, true, false, yes or no.")


def parse_uint(raw: str, key: str) -> int:
    """A non-negative decimal integer made of ASCII digits only (no sign, spaces or underscores)."""
    if not _UINT.fullmatch(raw):
        raise ConfigError(f"Unable to parse '{raw}' for '{key}'; expected a non-negative integer.")
    return int(raw)


def parse_fd(raw: str, key: str) -> int:
    """A file descriptor number (fits a C int, like StratoVirt's RawFd)."""
    value = parse_uint(raw, key)
    if value > 0x7FFF_FFFF:
        raise ConfigError(f"Unable to parse '{raw}' for '{key}'; a file descriptor must be below 2147483648.")
    return value


def parse_mem_size(raw: str, dialect: Dialect = Dialect.V0) -> int:
    """``256M``/``256m``/``1G``/``1g`` or a bare number, checked against the range: bytes (1 MiB
    aligned) in the 0.x dialect, MiB in 2.x (StratoVirt >= 2.0), each with its version's errors."""
    match = _SIZE.fullmatch(raw)
    if not match:
        bare = "bytes" if dialect is Dialect.V0 else "MiB"
        raise ConfigError(f"Unable to parse memory size '{raw}'; use {bare} or a number with an M or G suffix.")
    number, unit = int(match.group(1)), match.group(2).upper()
    if unit == "M" or (not unit and dialect is Dialect.V2):
        size = number * MiB
    elif unit == "G":
        size = number * GiB
    else:
        size = number
        if size % MiB:
            raise ConfigError(f"Input value {size} is unaligned with {MiB} for memory.")
    if not MIN_MEM_SIZE <= size <= MAX_MEM_SIZE:
        if dialect is Dialect.V2:
            raise ConfigError("Memory size must >= 128MiB and <= 512GiB, default unit: MiB, current memory "
                              f"size: {size} bytes.")
        raise ConfigError(MEM_RANGE_ERROR)
    return size


def range_error(what: str, low: int, high: int, high_inclusive: bool = True) -> ConfigError:
    """StratoVirt's IllegalValue sentence: ``CPU number must >= 1 and <= 254.``"""
    return ConfigError(f"{what} must >= {low} and <{'=' if high_inclusive else ''} {high}.")


def check_mac(mac: str) -> None:
    """Six colon-separated pairs of hex digits (``12:34:56:78:9A:BC``)."""
    if not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", mac):
        raise ConfigError(f"Mac address '{mac}' is illegal.")
