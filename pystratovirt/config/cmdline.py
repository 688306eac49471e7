"""From argv to a VmConfig, and what each option of the early (0.x) command line means.

Owns :func:`parse_command_line` and :class:`Invocation`. The order is StratoVirt's: tokenize
(:mod:`.args`), honour -help/-version, pick the dialect (:mod:`.dialect`); a 2.x command line is
read by :mod:`.cmdline2x`; a 0.x one reads the ``-config`` JSON file into a draft, applies the
shared options (:mod:`.common`) and its own on top (scalars override, devices are added); then
the whole is checked (:meth:`Draft.finish`).
"Scalars" include ``-append``, which replaces the file's ``boot_args`` (StratoVirt does the same),
``-serial``, ``-balloon`` and ``-rng``; ``-machine`` overrides only the properties it names.
``-drive``/``-netdev``/``-chardev``/``-iothread`` add to the file's lists (ids must stay unique) and
``-device vsock`` is an error if the file already has a vsock.

Choices where the early StratoVirt command line is silent or where we differ on purpose:

* StratoVirt's "set an initrd or a drive as rootfs" rule is not enforced, so that freestanding
  test guests can boot from the kernel alone.
* Booleans are case-insensitive. ``-netdev`` accepts a leading ``tap`` word and ``-chardev`` a
  leading ``socket`` word (the v0.1.0 syntax); ``vhostfds=`` needs ``vhost=on``.
* Checked here rather than when the VM starts, so that a bad command line fails before any KVM
  work: the kernel/initrd are regular files, drive files are regular files or block devices,
  the rng source exists, the QMP and console socket paths do not exist yet and fit in a
  ``sockaddr_un`` (107 bytes), an existing pidfile (``Pidfile path is existed yet.``), iothreads
  named by drives and nets are defined, and drive and net ids are unique together (they share
  the replaceable-slot namespace that QMP ``device_del`` looks up).
* Limits: at most 6 drives (v0.2.0's replaceable block slots; v0.3.0 has 4) and 2 nets; every
  path may be 4096 bytes (StratoVirt limits the initrd path to 255, a slip we do not copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import __version__
from ..machine.vmconfig import BalloonConfig, Dialect, SerialConfig, VmConfig
from . import args as A
from .common import apply_common, missing, parse_socket, value_of
from .dialect import pick_dialect
from .draft import Draft, new_console, new_drive, new_iothread, new_net, new_rng, new_vsock
from .errors import ConfigError
from .values import parse_bool, parse_fd, parse_kv, parse_uint


@dataclass(frozen=True)
class Invocation:
    """What the command line asks for: run ``config``, or print ``text`` (usage or version) and exit 0."""

    config: VmConfig | None
    action: Literal["run", "help", "version"]
    text: str = ""


def parse_command_line(argv: list[str], prog: str = "stratovirt") -> Invocation:
    """Parse the arguments after the program name; raise ConfigError (and nothing else) if they are invalid."""
    try:
        return _parse(list(argv), prog)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError("The configuration is nested too deeply to be parsed.") from None


def _parse(argv: list[str], prog: str) -> Invocation:
    for arg in argv:
        if not isinstance(arg, str):
            raise ConfigError(f"Command-line arguments must be strings, not {type(arg).__name__}.")
    parsed = A.tokenize(argv)
    if parsed.want == "help":
        return Invocation(None, "help", A.help_text(prog, __version__))
    if parsed.want == "version":
        return Invocation(None, "version", A.version_text(__version__))

    draft = Draft(dialect=pick_dialect(parsed))
    # Each dialect's reader, and the JSON schema, is imported only by the command lines that need
    # it: parsing is over before the VM is built, so the running VM never needs the others.
    if draft.dialect is Dialect.V2:
        from .cmdline2x import apply_args_2x
        apply_args_2x(draft, parsed)
    else:
        config_file = parsed.first("config")
        if config_file is not None:
            from .json_config import apply_json_file
            apply_json_file(draft, config_file.values[0])
        apply_args(draft, parsed)
    return Invocation(draft.finish(), "run", "")


def apply_args(draft: Draft, parsed: A.Parsed) -> None:
    """Apply every option of a 0.x command line except -config to ``draft``."""
    apply_common(draft, parsed)
    if (serial := value_of(parsed, "serial")) is not None:
        draft.serial = _parse_serial(serial)
    if (balloon := parsed.first("balloon")) is not None:
        draft.balloon = _parse_balloon(balloon.values[0] if balloon.values else "")
    if (rng := value_of(parsed, "rng")) is not None:
        kv = parse_kv(rng, "rng", ("random_file", "bytes_per_sec"))
        if "random_file" not in kv:
            raise missing("random_file", "rng")
        rate = parse_uint(kv["bytes_per_sec"], "bytes_per_sec") if "bytes_per_sec" in kv else None
        draft.rng = new_rng(kv["random_file"], rate)
    for occ in parsed.all("drive"):
        for value in occ.values:
            draft.add_drive(*parse_drive(value))
    for occ in parsed.all("device"):
        for value in occ.values:
            draft.set_vsock(_parse_device(value))
    for occ in parsed.all("netdev"):
        for value in occ.values:
            draft.add_net(*parse_netdev(value))
    for occ in parsed.all("chardev"):
        for value in occ.values:
            draft.add_console(*_parse_chardev(value))
    for occ in parsed.all("iothread"):
        for value in occ.values:
            kv = parse_kv(value, "iothread", ("id",))
            if "id" not in kv:
                raise missing("id", "iothread")
            draft.add_iothread(new_iothread(kv["id"]))
    if (api := value_of(parsed, "api-channel")) is not None:
        draft.qmp_socket = parse_socket(api, "api-channel")


def parse_drive(text: str):
    kv = parse_kv(text, "drive", ("file", "id", "readonly", "direct", "serial", "iothread", "iops"))
    if "file" not in kv:
        raise missing("file", "drive")
    if "id" not in kv:
        raise missing("id", "drive")
    return new_drive(
        id=kv["id"], path=kv["file"],
        read_only=parse_bool(kv["readonly"], "readonly") if "readonly" in kv else False,
        direct=parse_bool(kv["direct"], "direct") if "direct" in kv else True,
        serial=kv.get("serial"), iothread=kv.get("iothread"),
        iops=parse_uint(kv["iops"], "iops") if "iops" in kv else None,
    )


def parse_netdev(text: str):
    kv = parse_kv(text, "netdev", ("", "id", "netdev", "mac", "fds", "vhost", "vhostfds", "iothread"))
    if "" in kv and kv[""] != "tap":
        raise ConfigError(f"Invalid parameter '{kv['']}'")
    if "id" not in kv:
        raise missing("id", "netdev")
    if "netdev" not in kv:
        raise missing("netdev", "netdev")
    vhost = parse_bool(kv["vhost"], "vhost") if "vhost" in kv else False
    if "vhostfds" in kv and not vhost:
        raise ConfigError("-netdev vhostfds= needs vhost=on.")
    return new_net(
        id=kv["id"], tap=kv["netdev"], mac=kv.get("mac"), vhost=vhost,
        tap_fds=[parse_fd(kv["fds"], "fds")] if "fds" in kv else [],
        vhost_fds=[parse_fd(kv["vhostfds"], "vhostfds")] if "vhostfds" in kv else [],
        iothread=kv.get("iothread"),
    )


def _parse_chardev(text: str):
    kv = parse_kv(text, "chardev", ("", "id", "path"))
    if "" in kv and kv[""] != "socket":
        raise ConfigError(f"Invalid parameter '{kv['']}'")
    if "id" not in kv:
        raise missing("id", "chardev")
    if "path" not in kv:
        raise missing("path", "chardev")
    return new_console(kv["id"], kv["path"])


def _parse_device(text: str):
    kv = parse_kv(text, "device", ("", "id", "guest-cid", "vhostfd"))
    if "" not in kv:
        raise ConfigError("-device needs a device type first; the only type is 'vsock'.")
    if kv[""] != "vsock":
        raise ConfigError(f"Unknown device type '{kv['']}'; the only -device type is 'vsock'.")
    if "id" not in kv:
        raise missing("id", "vsock")
    if "guest-cid" not in kv:
        raise missing("guest-cid", "vsock")
    vhost_fd = parse_fd(kv["vhostfd"], "vhostfd") if "vhostfd" in kv else None
    return new_vsock(kv["id"], parse_uint(kv["guest-cid"], "guest-cid"), vhost_fd)


def _parse_serial(text: str) -> SerialConfig:
    kv = parse_kv(text, "serial", ("",))
    if kv[""] != "stdio":
        raise ConfigError(f"Invalid parameter '{kv['']}' for -serial: only 'stdio' is supported.")
    return SerialConfig(stdio=True)


def _parse_balloon(text: str) -> BalloonConfig:
    kv = parse_kv(text, "balloon", ("", "deflate-on-oom"))
    if kv.get("", ""):
        raise ConfigError(f"Invalid parameter '{kv['']}'")
    deflate = parse_bool(kv["deflate-on-oom"], "deflate-on-oom") if "deflate-on-oom" in kv else False
    return BalloonConfig(deflate_on_oom=deflate)

