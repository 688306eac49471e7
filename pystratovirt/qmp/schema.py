"""The QMP schema: JSON commands -> typed requests, typed results/events/errors -> JSON bytes.

This module owns every spelling the wire uses: command names, argument names and types, the
error texts for bad input, and the exact key order of every reply and event (the seed's
transcripts are the contract: ``{"return":{"running":true,"singlestep":false,"status":"running"}}``,
``{"event":"STOP","data":{},"timestamp":{"seconds":S,"microseconds":U}}``). A command is fully
validated here, before anything reaches the machine: unknown, missing and mistyped arguments are
rejected with a GenericError a person can act on. It holds no state and does no I/O.

Every string argument is checked before it can reach the OS, a log or a backend: no NUL (a C
string would end there), no lone surrogate (it has no UTF-8 encoding, so it cannot be a path, an
interface name or a log line), and a length limit in UTF-8 bytes (paths PATH_MAX-1, interface
names IFNAMSIZ-1, names and ids :data:`MAX_NAME`); descriptor references are numbers 0..2**31-1
or getfd names. A refusal names the parameter.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar, overload

from ..errors import PyStratoVirtError
from ..machine.fds import FD_MAX
from ..machine.fds import NAME as FD_NAME
from ..machine.requests import (
    Balloon,
    BalloonChangedEvent,
    BalloonGuestStats,
    BalloonInfo,
    BlockdevAdd,
    BlockdevDel,
    BlockIoErrorEvent,
    CloseFd,
    CommandInfo,
    Cont,
    CpuInfo,
    CpuProps,
    DeviceAdd,
    DeviceDel,
    DeviceDeletedEvent,
    ErrorClass,
    GetFd,
    HotpluggableCpu,
    Migrate,
    MigrationInfo,
    NetdevAdd,
    NetdevDel,
    QmpCapabilities,
    QomGet,
    QomSet,
    QueryBalloon,
    QueryCommands,
    QueryCpus,
    QueryHotpluggableCpus,
    QueryMigrate,
    QueryStatus,
    QueryVersion,
    Quit,
    Request,
    ResumeEvent,
    ShutdownEvent,
    ShutdownReason,
    StatusInfo,
    Stop,
    StopEvent,
    VersionInfo,
)
from ..util import strictjson
from ..virtio.block_backend import DriveConfig
from ..virtio.tap import NetdevConfig
from .wire import WIRE_0X

#: The QEMU version the default (0.x) dialect announces (``create_greeting(1, 0, 4)``).
VERSION = WIRE_0X.version

#: The largest single message the server buffers (StratoVirt used 8 KiB; QEMU has no small limit).
MAX_MESSAGE = 65536

#: A disk's serial number: at most VIRTIO_BLK_ID_BYTES.
SERIAL_MAX = 20

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

#: Longest id, node-name, driver or other name, in UTF-8 bytes (Kata's ids are at most 31).
MAX_NAME = 256
#: Longest path (PATH_MAX is 4096 bytes with the terminating NUL).
MAX_PATH = 4095
#: Longest interface name (IFNAMSIZ is 16 bytes with the terminating NUL).
MAX_IFNAME = 15
#: Longest free-form text (a qom-set value, a descriptor reference list).
MAX_TEXT = 4096


class QmpError(PyStratoVirtError):
    """A command rejected by the protocol layer; ``id`` is echoed when the command carried one."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GENERIC_ERROR,
                 id: object = None):
        super().__init__(desc, error_class)
        self.id = id


@dataclass(frozen=True)
class Command:
    """A validated command: its name, the typed request and the client's ``id`` (None if none)."""

    execute: str
    request: Request
    id: object = None


# ==================================================================================================
# Decoding
# ==================================================================================================


def decode(message: bytes) -> object:
    """Parse one framed message; raise QmpError (GenericError) when it is not valid JSON."""
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16/32, which QMP is not.
        return strictjson.loads(message.decode("utf-8"))
    except RecursionError:
        raise QmpError("Invalid JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError and the hooks' errors
        raise QmpError(f"Invalid JSON: {err}") from None


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False  # bool is an int subclass, but true is not a number
    return isinstance(value, (str, int, float))


def parse_command(obj: object) -> Command:
    """Validate a decoded message and build its typed request; raise QmpError if it is bad."""
    if not isinstance(obj, dict):
        raise QmpError("QMP input must be a JSON object")
    cmd_id = obj.get("id")
    if "id" in obj and not _valid_id(cmd_id):
        raise QmpError("QMP input member 'id' must be a number or a string")
    for key in obj:
        if key == "exec-oob":
            raise QmpError("Out-of-band execution is not supported", id=cmd_id)
        if key not in ("execute", "arguments", "id"):
            raise QmpError(f"QMP input member '{key}' is unexpected", id=cmd_id)
    if "execute" not in obj:
        raise QmpError("QMP input lacks member 'execute'", id=cmd_id)
    name = obj["execute"]
    if not isinstance(name, str):
        raise QmpError("QMP input member 'execute' must be a string", id=cmd_id)
    parser = _COMMANDS.get(name)
    if parser is None:
        raise QmpError(f"The command {name} has not been found", ErrorClass.COMMAND_NOT_FOUND,
                       id=cmd_id)
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        raise QmpError("QMP input member 'arguments' must be an object", id=cmd_id)
    try:
        request = parser(arguments)
    except _ArgumentError as err:
        raise QmpError(str(err), id=cmd_id) from None
    return Command(name, request, cmd_id)


def command_names() -> list[str]:
    """Every command the schema accepts, in a stable order (for query-commands)."""
    return list(_COMMANDS)


# --------------------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------------------


class _ArgumentError(Exception):
    pass


#: A command's ``arguments`` (or a nested object of them) as decoded from JSON.
Arguments = dict[str, object]


class _Required(enum.Enum):
    """The default of an argument that must be present (an enum, so its type can be spelled)."""

    REQUIRED = enum.auto()


_REQUIRED = _Required.REQUIRED

_T = TypeVar("_T")


class _Args:
    """One JSON object of arguments, read key by key with a type check for each.

    Unknown keys are refused up front (a typo should be named, not reported as a missing key);
    ``ignored`` keys are accepted with any value and dropped, because StratoVirt and QEMU clients
    send them and they mean nothing for a micro VM.
    """

    def __init__(self, values: Arguments, known: tuple[str, ...], ignored: tuple[str, ...] = (),
                 prefix: str = ""):
        self._values = values
        self._prefix = prefix
        for key in values:
            if key not in known and key not in ignored:
                raise _ArgumentError(f"Invalid parameter '{prefix}{key}'")

    def has(self, key: str) -> bool:
        return key in self._values

    def raw(self, key: str, default: object) -> object:
        if key in self._values:
            return self._values[key]
        return self.missing(key, default)

    def missing(self, key: str, default: _T | _Required) -> _T:
        """The default of an absent ``key``; an error if it has none."""
        if isinstance(default, _Required):
            raise _ArgumentError(f"Parameter '{self._prefix}{key}' is missing")
        return default

    def wrong(self, key: str, what: str) -> NoReturn:
        raise _ArgumentError(f"Parameter '{self._prefix}{key}' expects {what}")

    # Each typed reader below returns the argument (checked) when it is present, else its
    # default; without a default, an absent argument is an error. The overloads say so.
    @overload
    def string(self, key: str, default: _Required = _REQUIRED, *, nonempty: bool = False,
               max_bytes: int = MAX_NAME) -> str: ...
    @overload
    def string(self, key: str, default: _T, *, nonempty: bool = False,
               max_bytes: int = MAX_NAME) -> str | _T: ...

    def string(self, key: str, default: object = _REQUIRED, *, nonempty: bool = False,
               max_bytes: int = MAX_NAME) -> object:
        if key not in self._values:
            return self.missing(key, default)
        value = self._values[key]
        if not isinstance(value, str):
            self.wrong(key, "a string")
        if nonempty and not value:
            self.wrong(key, "a non-empty string")
        self.text(key, value, max_bytes)
        return value

    def text(self, key: str, value: str, max_bytes: int) -> None:
        """Refuse a string that cannot safely reach the OS, a log or a backend."""
        if "\x00" in value:
            self.wrong(key, "a string without NUL characters")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            self.wrong(key, "valid Unicode text (a lone surrogate has no UTF-8 encoding)")
        if size > max_bytes:
            self.wrong(key, f"a string of at most {max_bytes} bytes")

    @overload
    def boolean(self, key: str, default: _Required = _REQUIRED) -> bool: ...
    @overload
    def boolean(self, key: str, default: _T) -> bool | _T: ...

    def boolean(self, key: str, default: object = _REQUIRED) -> object:
        if key not in self._values:
            return self.missing(key, default)
        value = self._values[key]
        if not isinstance(value, bool):
            self.wrong(key, "a boolean")
        return value

    @overload
    def integer(self, key: str, lo: int, hi: int, default: _Required = _REQUIRED) -> int: ...
    @overload
    def integer(self, key: str, lo: int, hi: int, default: _T) -> int | _T: ...

    def integer(self, key: str, lo: int, hi: int, default: object = _REQUIRED) -> object:
        if key not in self._values:
            return self.missing(key, default)
        value = self._values[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong(key, "an integer")
        if not lo <= value <= hi:
            self.wrong(key, f"an integer from {lo} to {hi}")
        return value

    @overload
    def obj(self, key: str, known: tuple[str, ...], ignored: tuple[str, ...] = (),
            default: _Required = _REQUIRED) -> _Args: ...
    @overload
    def obj(self, key: str, known: tuple[str, ...], ignored: tuple[str, ...] = (), *,
            default: _T) -> _Args | _T: ...

    def obj(self, key: str, known: tuple[str, ...], ignored: tuple[str, ...] = (),
            default: object = _REQUIRED) -> object:
        if key not in self._values:
            return self.missing(key, default)
        value = self._values[key]
        if not isinstance(value, dict):
            self.wrong(key, "an object")
        return _Args(value, known, ignored, prefix=f"{self._prefix}{key}.")

    @overload
    def choice(self, key: str, choices: tuple[str, ...], default: _Required = _REQUIRED) -> str: ...
    @overload
    def choice(self, key: str, choices: tuple[str, ...], default: _T) -> str | _T: ...

    def choice(self, key: str, choices: tuple[str, ...], default: object = _REQUIRED) -> object:
        if key not in self._values:
            return self.missing(key, default)
        value = self._values[key]
        if not isinstance(value, str) or value not in choices:
            self.wrong(key, " or ".join(f"'{c}'" for c in choices))
        return value


_ADDR = re.compile(r"0[xX]([0-9a-fA-F]{1,8})|([0-9]{1,10})")


def _addr(args: _Args) -> int | None:
    """``addr``: the slot number as StratoVirt >= 2.0 reads it (``str_to_usize``): "0x1" is hex,
    "1" decimal (Kata sends ``fmt.Sprintf("%d")``); a bare integer is accepted too.

    StratoVirt 0.x quietly used slot 0 for an addr it could not parse, which hot-plugs into the
    wrong slot; we refuse it instead.
    """
    if not args.has("addr"):
        return None
    value = args.raw("addr", None)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U32_MAX:
        return value
    if isinstance(value, str):
        match = _ADDR.fullmatch(value)
        if match:
            number = int(match.group(1), 16) if match.group(1) else int(match.group(2))
            if number <= U32_MAX:
                return number
    args.wrong("addr", "a slot number such as '0x1' (hexadecimal) or '1' (decimal)")


_FD_FIELD = re.compile(r"[0-9]{1,10}")


def _fd_ref(args: _Args, key: str) -> str | None:
    """``fds``/``vhostfds``: a descriptor reference, kept as text for the machine's descriptor
    store: a number (0..2**31-1) or a getfd name, or several joined by ':' (StratoVirt's
    ``name:number`` and ``N:M``). qmp-shell sends a bare JSON number."""
    if not args.has(key):
        return None
    value = args.raw(key, None)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= FD_MAX:
        return str(value)
    if isinstance(value, str) and value and len(value) <= MAX_TEXT:
        fields = value.split(":")
        if all((_FD_FIELD.fullmatch(f) and int(f) <= FD_MAX) or FD_NAME.fullmatch(f)
               for f in fields):
            return value
    args.wrong(key, f"a file descriptor number (0 to {FD_MAX}) or a getfd name, or several "
                    "joined by ':'")


def _on_off(args: _Args, key: str, default: bool = False) -> bool:
    """A boolean that qmp-shell users (and govmm's ``share-rw``) also spell "on"/"off"."""
    value = args.raw(key, default)
    if isinstance(value, bool):
        return value
    if value in ("on", "off"):
        return value == "on"
    args.wrong(key, "a boolean (or 'on' or 'off')")


def _fd_name(args: _Args, key: str) -> str:
    """A getfd name: QEMU refuses a leading digit (it would read as a number); we also refuse
    ':' and unprintable characters, which could not appear in an ``fds`` reference."""
    name = args.string(key, nonempty=True)
    if name[0].isdigit():
        args.wrong(key, "a name not starting with a digit")
    if not FD_NAME.fullmatch(name):
        args.wrong(key, "a name of letters, digits, '_', '.' and '-' (at most 128)")
    return name


def _ifname(args: _Args, key: str) -> str | None:
    """A host interface name as the kernel's dev_valid_name() takes it."""
    name = args.string(key, None, nonempty=True, max_bytes=MAX_IFNAME)
    if name is not None and (name in (".", "..") or any(c in "/:" or c.isspace() for c in name)):
        args.wrong(key, "an interface name without '/', ':' or spaces")
    return name


_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


# --------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------

# Capabilities this server offers in its greeting: none (no out-of-band execution).
CAPABILITIES: tuple[str, ...] = ()


def _no_arguments(cls: Callable[[], Request]) -> Callable[[Arguments], Request]:
    def parse(arguments: Arguments) -> Request:
        _Args(arguments, known=())
        return cls()
    return parse


def _qmp_capabilities(arguments: Arguments) -> QmpCapabilities:
    # Kuasar (qapi-rs) always sends {"enable":[]}; StratoVirt 2.3 would refuse the key.
    a = _Args(arguments, known=("enable",))
    enable = a.raw("enable", [])
    if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
        a.wrong("enable", "a list of strings")
    for capability in enable:
        a.text("enable", capability, MAX_NAME)
        if capability not in CAPABILITIES:
            raise _ArgumentError(f"Capability '{capability}' not available")
    return QmpCapabilities(tuple(enable))


def _blockdev_add(arguments: Arguments) -> BlockdevAdd:
    # StratoVirt v0.2 also accepts read-zeros/discard/id/options/backing and ignores them; they
    # never reach a backend, so they are not checked either.
    a = _Args(arguments, known=("node-name", "file", "cache", "read-only", "driver"),
              ignored=("discard", "detect-zeroes", "read-zeros", "id", "options", "backing",
                       "auto-read-only"))
    node_name = a.string("node-name", nonempty=True)
    # The format driver: only raw images exist here, so anything else must not be silently
    # treated as raw.
    a.choice("driver", ("raw",), default="raw")
    file = a.obj("file", known=("driver", "filename", "aio", "locking"))
    # aio picks QEMU's I/O engine and locking its image locks: neither changes what the guest
    # sees, and this VMM has one engine (a thread per disk) and takes no image locks.
    file.choice("aio", ("native", "threads"), default="native")
    file.choice("locking", ("auto", "on", "off"), default="auto")
    cache = a.obj("cache", known=("direct", "no-flush"), default=None)
    # file.driver ("file" or "host_device") only says what kind of node it is; both open the
    # same way here.
    file.choice("driver", ("file", "host_device"), default="file")
    return BlockdevAdd(DriveConfig(
        id=node_name,
        path=file.string("filename", nonempty=True, max_bytes=MAX_PATH),
        read_only=a.boolean("read-only", False),
        direct=cache.boolean("direct", True) if cache else True,
        no_flush=cache.boolean("no-flush", False) if cache else False,
    ))


def _blockdev_del(arguments: Arguments) -> BlockdevDel:
    a = _Args(arguments, known=("node-name",))
    return BlockdevDel(a.string("node-name", nonempty=True))


def _netdev_add(arguments: Arguments) -> NetdevAdd:
    a = _Args(arguments, known=("id", "ifname", "fds", "vhost", "vhostfds", "type", "script",
                                "downscript", "queues"),
              ignored=("dnssearch",))  # a user-mode (slirp) option: meaningless for a tap
    netdev_id = a.string("id", nonempty=True)
    a.choice("type", ("tap",), default="tap")
    # govmm sends script/downscript "no" with every named tap. The VMM never runs host
    # scripts, so any other value would be an option accepted and ignored: refused.
    for key in ("script", "downscript"):
        if a.has(key) and a.raw(key, None) != "no":
            a.wrong(key, "'no' (this VMM never runs host scripts)")
    if a.has("queues") and a.integer("queues", 0, U32_MAX) != 1:
        a.wrong("queues", "1 (multi-queue taps are not supported)")
    ifname = _ifname(a, "ifname")
    fds = _fd_ref(a, "fds")
    if ifname is None and fds is None:
        raise _ArgumentError("Parameter 'ifname' or 'fds' is missing")
    vhostfds = _fd_ref(a, "vhostfds")
    return NetdevAdd(NetdevConfig(id=netdev_id, ifname=ifname, fds=(fds,) if fds is not None else (),
                                  vhost=_on_off(a, "vhost"),
                                  vhostfds=(vhostfds,) if vhostfds is not None else ()))


def _netdev_del(arguments: Arguments) -> NetdevDel:
    a = _Args(arguments, known=("id",))
    return NetdevDel(a.string("id", nonempty=True))


def _device_add(arguments: Arguments) -> DeviceAdd:
    a = _Args(arguments, known=("id", "driver", "addr", "lun", "drive", "netdev", "mac", "serial",
                                "romfile", "share-rw", "bus", "iothread", "disable-modern", "mq",
                                "vectors"))
    # What the micro-VM has no use for, checked so nothing wrong slips through: no option ROMs
    # (govmm always sends romfile ""), no image locks to share (share-rw), no buses (a slot is
    # the address), one I/O thread per disk, no MSI-X (vectors), modern virtio only.
    if a.has("romfile") and a.raw("romfile", None) != "":
        a.wrong("romfile", "'' (option ROMs are not supported)")
    _on_off(a, "share-rw")
    a.string("bus", None, nonempty=True)
    a.string("iothread", None, nonempty=True)
    a.integer("vectors", 0, 2048, None)
    if _on_off(a, "disable-modern"):
        a.wrong("disable-modern", "false (only modern virtio devices exist here)")
    if _on_off(a, "mq"):
        a.wrong("mq", "false (multi-queue devices are not supported)")
    mac = a.string("mac", None)
    if mac is not None and not _MAC.fullmatch(mac):
        a.wrong("mac", "a MAC address such as '52:54:00:12:34:56'")
    return DeviceAdd(id=a.string("id", nonempty=True), driver=a.string("driver", nonempty=True),
                     addr=_addr(a), lun=a.integer("lun", 0, U32_MAX, None),
                     drive=a.string("drive", None, nonempty=True),
                     netdev=a.string("netdev", None, nonempty=True), mac=mac,
                     serial=a.string("serial", None, max_bytes=SERIAL_MAX))


def _device_del(arguments: Arguments) -> DeviceDel:
    a = _Args(arguments, known=("id",))
    return DeviceDel(a.string("id", nonempty=True))


def _balloon(arguments: Arguments) -> Balloon:
    a = _Args(arguments, known=("value",))
    return Balloon(a.integer("value", 0, U64_MAX))


def _qom_get(arguments: Arguments) -> QomGet:
    a = _Args(arguments, known=("path", "property"))
    return QomGet(path=a.string("path", max_bytes=MAX_PATH), property=a.string("property"))


def _qom_set(arguments: Arguments) -> QomSet:
    a = _Args(arguments, known=("path", "property", "value"))
    path, prop = a.string("path", max_bytes=MAX_PATH), a.string("property")
    value = a.raw("value", _REQUIRED)
    if isinstance(value, (dict, list)) or value is None:
        a.wrong("value", "a number, a string or a boolean")
    if isinstance(value, str):
        a.text("value", value, MAX_TEXT)
    return QomSet(path=path, property=prop, value=value)


def _getfd(arguments: Arguments) -> GetFd:
    # The descriptor itself travels in SCM_RIGHTS; the server adds it to the request.
    a = _Args(arguments, known=("fdname",))
    return GetFd(fdname=_fd_name(a, "fdname"))


def _closefd(arguments: Arguments) -> CloseFd:
    a = _Args(arguments, known=("fdname",))
    return CloseFd(fdname=_fd_name(a, "fdname"))


#: Migration URI schemes QEMU or StratoVirt know and this VMM does not offer (live migration).
_LIVE_MIGRATION_SCHEMES = ("tcp", "unix", "exec", "fd", "rdma", "vsock")


def _migrate(arguments: Arguments) -> Migrate:
    # QEMU's other arguments (blk, inc, detach, resume) ask for things a snapshot to a directory
    # does not do; detach is ignored by QEMU itself, so it is the only one accepted.
    a = _Args(arguments, known=("uri",), ignored=("detach",))
    uri = a.string("uri", nonempty=True)
    scheme, sep, target = uri.partition(":")
    if sep and scheme == "file":
        if not target:
            a.wrong("uri", "'file:' followed by a directory")
        return Migrate(path=target)
    if sep and scheme in _LIVE_MIGRATION_SCHEMES:
        raise _ArgumentError(f"Migration to '{scheme}:' is not supported: only snapshots to a "
                             "directory ('file:DIR') are.")
    a.wrong("uri", "a URI of the form 'file:DIR'")


_COMMANDS: dict[str, Callable[[Arguments], Request]] = {
    "qmp_capabilities": _qmp_capabilities,
    "query-version": _no_arguments(QueryVersion),
    "query-commands": _no_arguments(QueryCommands),
    "query-status": _no_arguments(QueryStatus),
    "query-cpus": _no_arguments(QueryCpus),
    "query-hotpluggable-cpus": _no_arguments(QueryHotpluggableCpus),
    "stop": _no_arguments(Stop),
    "cont": _no_arguments(Cont),
    "quit": _no_arguments(Quit),
    "blockdev-add": _blockdev_add,
    "blockdev-del": _blockdev_del,
    "netdev_add": _netdev_add,
    "netdev_del": _netdev_del,
    "device_add": _device_add,
    "device_del": _device_del,
    "balloon": _balloon,
    "query-balloon": _no_arguments(QueryBalloon),
    "qom-get": _qom_get,
    "qom-set": _qom_set,
    "getfd": _getfd,
    "closefd": _closefd,
    "migrate": _migrate,
    "query-migrate": _no_arguments(QueryMigrate),
}


# ==================================================================================================
# Encoding. Python dicts keep insertion order, so each dict literal below *is* the wire key order.
# ==================================================================================================


def _props(props: CpuProps) -> dict[str, object]:
    return {"core-id": props.core_id, "socket-id": props.socket_id, "thread-id": props.thread_id}


def _version(v: VersionInfo) -> dict[str, object]:
    return {"qemu": {"micro": v.micro, "minor": v.minor, "major": v.major}, "package": v.package}


#: QEMU's names for the balloon statistics in ``guest-stats``, in its order, keyed by the
#: device's names (virtio.balloon.STAT_NAMES). A statistic the guest did not report is shown
#: as QEMU shows it: (uint64) -1.
_GUEST_STAT_NAMES = {
    "swap-in": "stat-swap-in",
    "swap-out": "stat-swap-out",
    "major-faults": "stat-major-faults",
    "minor-faults": "stat-minor-faults",
    "free-memory": "stat-free-memory",
    "total-memory": "stat-total-memory",
    "available-memory": "stat-available-memory",
    "disk-caches": "stat-disk-caches",
    "hugetlb-allocations": "stat-htlb-pgalloc",
    "hugetlb-failures": "stat-htlb-pgfail",
}


def result_to_json(result: object) -> object:
    """The JSON value of a result: a result dataclass, a list of them, or None (``{}``)."""
    match result:
        case None:
            return {}
        case list() | tuple():
            return [result_to_json(item) for item in result]
        case StatusInfo():
            return {"running": result.running, "singlestep": result.singlestep,
                    "status": result.status.value}
        case CpuInfo():
            return {"CPU": result.cpu_index, "arch": result.arch, "current": result.current,
                    "halted": result.halted, "props": _props(result.props),
                    "qom_path": result.qom_path, "thread_id": result.thread_id}
        case HotpluggableCpu():
            item: dict[str, object] = {"props": _props(result.props)}
            if result.qom_path is not None:  # offline vCPUs have no qom-path
                item["qom-path"] = result.qom_path
            item["type"] = result.type
            item["vcpus-count"] = result.vcpus_count
            return item
        case BalloonInfo():
            return {"actual": result.actual}
        case BalloonGuestStats():
            return {"last-update": result.last_update,
                    "stats": {wire: result.values.get(name, U64_MAX)
                              for name, wire in _GUEST_STAT_NAMES.items()}}
        case int() if not isinstance(result, bool):  # a qom-get of a number
            return result
        case VersionInfo():
            return _version(result)
        case CommandInfo():
            return {"name": result.name}
        case MigrationInfo():
            info: dict[str, object] = {"status": result.status.value}
            if result.total_time_ms is not None:
                info["total-time"] = result.total_time_ms
            if result.ram is not None:
                ram = result.ram
                info["ram"] = {"transferred": ram.transferred, "remaining": ram.remaining,
                               "total": ram.total, "duplicate": ram.duplicate, "normal": ram.normal,
                               "normal-bytes": ram.normal_bytes}
            if result.error_desc is not None:
                info["error-desc"] = result.error_desc
            return info
    raise TypeError(f"no QMP encoding for result {result!r}")


def event_to_json(event: object) -> tuple[str, dict[str, object]]:
    """The QMP name and ``data`` of an event."""
    match event:
        case ShutdownEvent():
            return "SHUTDOWN", {"guest": event.guest,
                                "reason": ShutdownReason(event.reason).value}
        case StopEvent():
            return "STOP", {}
        case ResumeEvent():
            return "RESUME", {}
        case DeviceDeletedEvent():
            return "DEVICE_DELETED", {"device": event.device, "path": event.path}
        case BalloonChangedEvent():
            return "BALLOON_CHANGED", {"actual": event.actual}
        case BlockIoErrorEvent():
            # QEMU 7.2's qapi order; node-name and nospace are optional members.
            data: dict[str, object] = {"device": event.device}
            if event.node_name is not None:
                data["node-name"] = event.node_name
            data["operation"] = event.operation.value
            data["action"] = event.action.value
            if event.nospace is not None:
                data["nospace"] = event.nospace
            data["reason"] = event.reason
            return "BLOCK_IO_ERROR", data
    raise TypeError(f"no QMP encoding for event {event!r}")


def _dump(obj: object, line_end: bytes) -> bytes:
    # Compact separators, as StratoVirt (serde_json) writes them; the dialect picks the line end.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + line_end


def _with_id(message: dict[str, object], cmd_id: object) -> dict[str, object]:
    if cmd_id is not None:
        message["id"] = cmd_id
    return message


def encode_greeting(version: VersionInfo = VERSION, line_end: bytes = b"\n") -> bytes:
    return _dump({"QMP": {"version": _version(version), "capabilities": list(CAPABILITIES)}},
                 line_end)


def encode_return(result: object, cmd_id: object = None, line_end: bytes = b"\n") -> bytes:
    return _dump(_with_id({"return": result_to_json(result)}, cmd_id), line_end)


def encode_error(error_class: ErrorClass, desc: str, cmd_id: object = None,
                 line_end: bytes = b"\n") -> bytes:
    return _dump(_with_id({"error": {"class": error_class.value, "desc": desc}}, cmd_id),
                 line_end)


def encode_event(event: object, timestamp_ns: int, line_end: bytes = b"\n") -> bytes:
    """An event stamped with ``timestamp_ns`` (wall clock, nanoseconds since the epoch)."""
    name, data = event_to_json(event)
    seconds, microseconds = divmod(timestamp_ns // 1000, 1_000_000)
    return _dump({"event": name, "data": data,
                  "timestamp": {"seconds": seconds, "microseconds": microseconds}}, line_end)


GREETING = encode_greeting()
