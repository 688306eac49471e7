"""The ``-config file.json`` schema of early StratoVirt (v0.1.0 - v0.3.0), read into a Draft.

Owns: reading and decoding the file, the JSON key names and their types. The file is applied
before the rest of the command line, which may then override it.

Top-level keys: ``boot-source``, ``machine-config``, ``drive``, ``net``, ``console``, ``vsock``,
``serial``, ``iothread``, ``balloon``, ``rng``; anything else is ``Invalid json field '<k>'``
(v0.2.0+). Unknown keys inside a section are errors too (StratoVirt's serde
``deny_unknown_fields`` for drive and net; we apply it everywhere, naming the key's place, e.g.
``Invalid json field 'drive[0].readonly'``). Where StratoVirt stringifies a value before parsing
it, both spellings work: ``vcpu_count`` 4 or "4", ``mem_size`` 268435456 or "256M", and the
machine-config booleans true or "true". A key given twice in one object is an error (Python's
json would silently keep the last one). Our extensions in ``machine-config``: ``max_vcpus``
(offline vCPU slots), ``kernel_extract`` (see :mod:`.cmdline`) and ``name`` (the v0.1.0 key).
"""

from __future__ import annotations

import json
from typing import Any, Literal, overload

from ..machine.vmconfig import MAX_ID_LEN, MAX_VCPUS, BalloonConfig, SerialConfig
from ..util import strictjson
from .draft import (
    Draft,
    check_machine_type,
    check_path,
    new_console,
    new_drive,
    new_iothread,
    new_net,
    new_rng,
    new_vsock,
)
from .errors import ConfigError
from .values import check_len, parse_bool, parse_mem_size, parse_uint, range_error

_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}

_MISSING = object()


def apply_json_file(draft: Draft, path: str) -> None:
    """Read ``path`` (its name must contain "json") and apply it to ``draft``."""
    if "json" not in path:
        raise ConfigError("Only support 'json' format config-file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(f"Failed to open config file by: {err.strerror or err}.") from None
    except ValueError as err:
        raise ConfigError(f"Failed to open config file by: {err}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"The config file '{path}' is not valid UTF-8 (byte {err.start}).") from None
    apply_json_text(draft, text, path)


def apply_json_text(draft: Draft, text: str, source: str = "<json>") -> None:
    try:
        doc = strictjson.loads(text)
    except strictjson.DuplicateKeyError as err:
        raise ConfigError(f"Duplicate json field '{err.key}' in the config file.") from None
    except strictjson.StrictJsonError as err:
        raise ConfigError(f"Failed to parse config file: {err}.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"Failed to parse config file '{source}': {err.msg} at line {err.lineno} "
                          f"column {err.colno}.") from None
    except RecursionError:
        raise ConfigError(f"Failed to parse config file '{source}': it is nested too deeply.") from None
    except ValueError:  # an integer literal longer than sys.get_int_max_str_digits()
        raise ConfigError(f"Failed to parse config file '{source}': a number in it has too many digits.") from None
    apply_json(draft, doc)


def apply_json(draft: Draft, doc: Any) -> None:
    """Apply a decoded JSON document to ``draft``."""
    if not isinstance(doc, dict):
        raise ConfigError(f"The config file must hold a JSON object, not {_type_name(doc)}.")
    for key, value in doc.items():
        handler = _SECTIONS.get(key)
        if handler is None:
            raise ConfigError(f"Invalid json field '{key}'")
        handler(draft, value)


# -- typed access --------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _type_error(where: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"Json field '{where}' must be {expected}, not {_type_name(value)}.")


def _object(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _type_error(where, "an object", value)
    for key in value:
        if key not in keys:
            raise ConfigError(f"Invalid json field '{where}.{key}'")
    return value


def _array(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _type_error(where, "an array", value)
    return value


def _get(obj: dict[str, Any], key: str, where: str, required: bool) -> Any:
    """The value, or None when absent or null; a required key must be present and not null."""
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise ConfigError(f"Json field '{where}.{key}' is required.")
        return None
    return value


# A required key is never None (its absence is an error): the overloads of the readers say so.
@overload
def _str(obj: dict[str, Any], key: str, where: str, required: Literal[True]) -> str: ...
@overload
def _str(obj: dict[str, Any], key: str, where: str, required: bool = False) -> str | None: ...
def _str(obj: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = _get(obj, key, where, required)
    if value is not None and not isinstance(value, str):
        raise _type_error(f"{where}.{key}", "a string", value)
    return value


@overload
def _bool(obj: dict[str, Any], key: str, where: str, required: Literal[True], strings: bool = False) -> bool: ...
@overload
def _bool(obj: dict[str, Any], key: str, where: str, required: bool = False,
          strings: bool = False) -> bool | None: ...
def _bool(obj: dict[str, Any], key: str, where: str, required: bool = False, strings: bool = False) -> bool | None:
    value = _get(obj, key, where, required)
    if value is None or isinstance(value, bool):
        return value
    if strings and isinstance(value, str):
        return parse_bool(value, key)
    raise _type_error(f"{where}.{key}", "a boolean", value)


@overload
def _uint(obj: dict[str, Any], key: str, where: str, required: Literal[True], strings: bool = False,
          limit: int | None = None) -> int: ...
@overload
def _uint(obj: dict[str, Any], key: str, where: str, required: bool = False, strings: bool = False,
          limit: int | None = None) -> int | None: ...
def _uint(obj: dict[str, Any], key: str, where: str, required: bool = False, strings: bool = False,
          limit: int | None = None) -> int | None:
    value = _get(obj, key, where, required)
    if value is None:
        return None
    if strings and isinstance(value, str):
        value = parse_uint(value, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(f"{where}.{key}", "a non-negative integer", value)
    if value < 0:
        raise ConfigError(f"Json field '{where}.{key}' must be a non-negative integer, not {value}.")
    if limit is not None and value > limit:
        raise ConfigError(f"Json field '{where}.{key}' must be at most {limit}, not {value}.")
    return value


_FD_LIMIT = 0x7FFF_FFFF


# -- sections ------------------------------------------------------------------------------------

def _boot_source(draft: Draft, value: Any) -> None:
    where = "boot-source"
    obj = _object(value, where, ("kernel_image_path", "boot_args", "initrd_fs_path"))
    if (kernel := _str(obj, "kernel_image_path", where)) is not None:
        check_path(kernel, "kernel image path")
        draft.kernel = kernel
    if (cmdline := _str(obj, "boot_args", where)) is not None:
        draft.cmdline = cmdline
    if (initrd := _str(obj, "initrd_fs_path", where)) is not None:
        check_path(initrd, "initrd path")
        draft.initrd = initrd


def _machine_config(draft: Draft, value: Any) -> None:
    where = "machine-config"
    obj = _object(value, where, ("type", "name", "vcpu_count", "max_vcpus", "mem_size", "mem_path", "mem_share",
                                 "dump_guest_core", "kernel_extract"))
    if (mtype := _str(obj, "type", where)) is not None:
        check_machine_type(mtype)
    if (name := _str(obj, "name", where)) is not None:
        check_len(name, "name", MAX_ID_LEN)
        draft.name = name
    if (vcpus := _uint(obj, "vcpu_count", where, strings=True)) is not None:
        if not 1 <= vcpus <= MAX_VCPUS:
            raise range_error("CPU number", 1, MAX_VCPUS)
        draft.vcpus = vcpus
    if (max_vcpus := _uint(obj, "max_vcpus", where, strings=True)) is not None:
        if not 1 <= max_vcpus <= MAX_VCPUS:  # max_vcpus >= vcpu_count is checked on the whole config
            raise range_error("Max CPU number", 1, MAX_VCPUS)
        draft.max_vcpus = max_vcpus
    mem = _get(obj, "mem_size", where, False)
    if mem is not None:
        if isinstance(mem, bool) or not isinstance(mem, (int, str)):
            raise _type_error(f"{where}.mem_size", "an integer or a string such as \"256M\"", mem)
        draft.mem_size = parse_mem_size(str(mem))
    if (mem_path := _str(obj, "mem_path", where)) is not None:
        check_path(mem_path, "mem-path")
        draft.mem_path = mem_path
    if (share := _bool(obj, "mem_share", where, strings=True)) is not None:
        draft.mem_share = share
    if (dump := _bool(obj, "dump_guest_core", where, strings=True)) is not None:
        draft.dump_guest_core = dump
    if (extract := _bool(obj, "kernel_extract", where, strings=True)) is not None:
        draft.extract_payload = extract


def _drives(draft: Draft, value: Any) -> None:
    for i, item in enumerate(_array(value, "drive")):
        where = f"drive[{i}]"
        obj = _object(item, where, ("drive_id", "path_on_host", "read_only", "direct", "serial_num", "iothread",
                                    "iops"))
        draft.add_drive(*new_drive(
            id=_str(obj, "drive_id", where, True), path=_str(obj, "path_on_host", where, True),
            read_only=_bool(obj, "read_only", where, True), direct=_bool(obj, "direct", where, True),
            serial=_str(obj, "serial_num", where), iothread=_str(obj, "iothread", where),
            iops=_uint(obj, "iops", where),
        ))


def _nets(draft: Draft, value: Any) -> None:
    for i, item in enumerate(_array(value, "net")):
        where = f"net[{i}]"
        obj = _object(item, where, ("iface_id", "host_dev_name", "mac", "tap_fd", "vhost_type", "vhost_fd",
                                    "iothread"))
        vhost_type = _str(obj, "vhost_type", where)
        if vhost_type is not None and vhost_type != "vhost-kernel":
            raise ConfigError(f"Unknown vhost type '{vhost_type}' in '{where}'; the only type is 'vhost-kernel'.")
        tap_fd = _uint(obj, "tap_fd", where, limit=_FD_LIMIT)
        vhost_fd = _uint(obj, "vhost_fd", where, limit=_FD_LIMIT)
        if vhost_fd is not None and vhost_type is None:
            raise ConfigError(f"Json field '{where}.vhost_fd' needs \"vhost_type\": \"vhost-kernel\".")
        draft.add_net(*new_net(
            id=_str(obj, "iface_id", where, True), tap=_str(obj, "host_dev_name", where, True),
            mac=_str(obj, "mac", where), vhost=vhost_type is not None,
            tap_fds=[] if tap_fd is None else [tap_fd], vhost_fds=[] if vhost_fd is None else [vhost_fd],
            iothread=_str(obj, "iothread", where),
        ))


def _consoles(draft: Draft, value: Any) -> None:
    for i, item in enumerate(_array(value, "console")):
        where = f"console[{i}]"
        obj = _object(item, where, ("console_id", "socket_path"))
        draft.add_console(*new_console(_str(obj, "console_id", where, True), _str(obj, "socket_path", where, True)))


def _vsock(draft: Draft, value: Any) -> None:
    where = "vsock"
    obj = _object(value, where, ("vsock_id", "guest_cid", "vhost_fd"))
    draft.set_vsock(new_vsock(_str(obj, "vsock_id", where, True), _uint(obj, "guest_cid", where, True),
                              _uint(obj, "vhost_fd", where, limit=_FD_LIMIT)))


def _serial(draft: Draft, value: Any) -> None:
    obj = _object(value, "serial", ("stdio",))
    draft.serial = SerialConfig(stdio=_bool(obj, "stdio", "serial", True))


def _iothreads(draft: Draft, value: Any) -> None:
    for i, item in enumerate(_array(value, "iothread")):
        where = f"iothread[{i}]"
        obj = _object(item, where, ("id",))
        draft.add_iothread(new_iothread(_str(obj, "id", where, True)))


def _balloon(draft: Draft, value: Any) -> None:
    obj = _object(value, "balloon", ("deflate_on_oom",))
    draft.balloon = BalloonConfig(deflate_on_oom=_bool(obj, "deflate_on_oom", "balloon", True))


def _rng(draft: Draft, value: Any) -> None:
    obj = _object(value, "rng", ("random_file", "bytes_per_sec"))
    draft.rng = new_rng(_str(obj, "random_file", "rng", True), _uint(obj, "bytes_per_sec", "rng"))


_SECTIONS = {
    "boot-source": _boot_source,
    "machine-config": _machine_config,
    "drive": _drives,
    "net": _nets,
    "console": _consoles,
    "vsock": _vsock,
    "serial": _serial,
    "iothread": _iothreads,
    "balloon": _balloon,
    "rng": _rng,
}
