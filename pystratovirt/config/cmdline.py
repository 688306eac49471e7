"""From argv to a VmConfig: what each command-line option means.

Owns :func:`parse_command_line` and :class:`Invocation`. The order is StratoVirt's: tokenize
(:mod:`.args`), honour -help/-version, read the ``-config`` JSON file into a draft, apply the other
options on top (scalars override, devices are added), then check the whole (:meth:`Draft.finish`).
"Scalars" include ``-append``, which replaces the file's ``boot_args`` (StratoVirt does the same),
``-serial``, ``-balloon`` and ``-rng``; ``-machine`` overrides only the properties it names.
``-drive``/``-netdev``/``-chardev``/``-iothread`` add to the file's lists (ids must stay unique) and
``-device vsock`` is an error if the file already has a vsock.

Choices where the early StratoVirt command line is silent or where we differ on purpose:

* The management socket is OPTIONAL. StratoVirt requires ``-api-channel``; a VM without a
  management socket is still useful for embedding and quick tests. ``-api-channel`` and its v2.0
  spelling ``-qmp`` mean the same (``unix:PATH[,server][,nowait]``); giving both is an error. An
  existing socket path is an error: StratoVirt does not unlink it and neither do we.
* ``-machine ...,kernel-extract=on|off`` (JSON: ``"machine-config": {"kernel_extract": bool}``) is
  our extension: with a bzImage, ``on`` (the default) decompresses the payload on the host and
  boots it directly, ``off`` boots the image's own decompressor.
* ``-smp`` also takes ``maxcpus=`` (offline vCPU slots; JSON ``max_vcpus``) and QEMU-style
  ``sockets=/cores=/threads=``, which must multiply to maxcpus. They are checked, not stored:
  early StratoVirt shows the guest a fixed topology. ``-smp`` replaces both counts, so
  ``-smp 2`` over a JSON ``max_vcpus`` of 4 gives 2/2.
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

from dataclasses import dataclass, replace
from typing import Literal

from .. import __version__
from ..machine.vmconfig import MAX_ID_LEN, MAX_VCPUS, BalloonConfig, IncomingConfig, SerialConfig, VmConfig

from . import args as A
from .draft import (
    Draft, check_machine_type, check_path, check_socket_path, check_vcpus, new_console, new_drive, new_iothread,
    new_net, new_rng, new_vsock,
)
from .errors import ConfigError
from .json_config import apply_json_file
from .values import check_len, parse_bool, parse_fd, parse_kv, parse_mem_size, parse_uint, range_error


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

    draft = Draft()
    config_file = parsed.first("config")
    if config_file is not None:
        apply_json_file(draft, config_file.values[0])
    apply_args(draft, parsed)
    config = draft.finish()
    if (incoming := _value(parsed, "incoming")) is not None:
        config = replace(config, incoming=parse_incoming(incoming))
    return Invocation(config, "run", "")


def parse_incoming(value: str) -> IncomingConfig:
    """``-incoming file:DIR``: restore from the snapshot in DIR (StratoVirt 2.x's template start).
    Live migration (``tcp:``, ``unix:``) is not offered."""
    scheme, sep, path = value.partition(":")
    if not sep or scheme != "file":
        raise ConfigError(f"-incoming '{value}' is not supported: only 'file:DIR' (a snapshot "
                          "directory) is.")
    check_path(path, "snapshot directory")
    return IncomingConfig(path)


def _value(parsed: A.Parsed, name: str) -> str | None:
    occ = parsed.first(name)
    return None if occ is None else occ.values[0]


def apply_args(draft: Draft, parsed: A.Parsed) -> None:
    """Apply every option except -config to ``draft``."""
    if (name := _value(parsed, "name")) is not None:
        check_len(name, "name", MAX_ID_LEN)
        draft.name = name
    if (machine := _value(parsed, "machine")) is not None:
        _apply_machine(draft, machine)
    if (mem := _value(parsed, "m")) is not None:
        kv = parse_kv(mem, "m", ("", "size"))
        if "" in kv and "size" in kv:
            raise ConfigError("Give the memory size once: either '-m <size>' or '-m size=<size>'.")
        draft.mem_size = parse_mem_size(kv.get("", kv.get("size", "")))
    if (mem_path := _value(parsed, "mem-path")) is not None:
        check_path(mem_path, "mem-path")
        draft.mem_path = mem_path
    if (smp := _value(parsed, "smp")) is not None:
        draft.vcpus, draft.max_vcpus = parse_smp(smp)
    if (kernel := _value(parsed, "kernel")) is not None:
        check_path(kernel, "kernel image path")
        draft.kernel = kernel
    if (initrd := _value(parsed, "initrd")) is not None:
        check_path(initrd, "initrd path")
        draft.initrd = initrd
    if (serial := _value(parsed, "serial")) is not None:
        draft.serial = _parse_serial(serial)
    if (balloon := parsed.first("balloon")) is not None:
        draft.balloon = _parse_balloon(balloon.values[0] if balloon.values else "")
    if (rng := _value(parsed, "rng")) is not None:
        kv = parse_kv(rng, "rng", ("random_file", "bytes_per_sec"))
        if "random_file" not in kv:
            raise _missing("random_file", "rng")
        rate = parse_uint(kv["bytes_per_sec"], "bytes_per_sec") if "bytes_per_sec" in kv else None
        draft.rng = new_rng(kv["random_file"], rate)
    appends = parsed.all("append")
    if appends:
        draft.cmdline = " ".join(value for occ in appends for value in occ.values)
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
                raise _missing("id", "iothread")
            draft.add_iothread(new_iothread(kv["id"]))

    api, qmp = _value(parsed, "api-channel"), _value(parsed, "qmp")
    if api is not None and qmp is not None:
        raise ConfigError("-api-channel and -qmp both set the management socket; give only one of them.")
    if api is not None or qmp is not None:
        draft.qmp_socket = parse_socket(api if api is not None else qmp, "api-channel" if api is not None else "qmp")
    if (log := parsed.first("D")) is not None:
        draft.log_file = log.values[0] if log.values else ""
        if draft.log_file:
            check_path(draft.log_file, "log file path")
    if (pidfile := _value(parsed, "pidfile")) is not None:
        check_path(pidfile, "pidfile path")
        draft.pidfile = pidfile
    draft.daemonize = draft.daemonize or bool(parsed.all("daemonize"))
    draft.mem_prealloc = draft.mem_prealloc or bool(parsed.all("mem-prealloc"))
    draft.disable_seccomp = draft.disable_seccomp or bool(parsed.all("disable-seccomp"))
    draft.freeze = draft.freeze or bool(parsed.all("freeze"))


def _missing(field: str, device: str) -> ConfigError:
    return ConfigError(f"'{field}' is missing for '{device}' device.")


def _apply_machine(draft: Draft, text: str) -> None:
    kv = parse_kv(text, "machine", ("", "type", "dump-guest-core", "mem-share", "kernel-extract"))
    for key in ("", "type"):
        if key in kv:
            check_machine_type(kv[key])
    if "dump-guest-core" in kv:
        draft.dump_guest_core = parse_bool(kv["dump-guest-core"], "dump-guest-core")
    if "mem-share" in kv:
        draft.mem_share = parse_bool(kv["mem-share"], "mem-share")
    if "kernel-extract" in kv:
        draft.extract_payload = parse_bool(kv["kernel-extract"], "kernel-extract")


def parse_smp(text: str) -> tuple[int, int]:
    """``[cpus=]n[,maxcpus=m][,sockets=s][,cores=c][,threads=t]`` -> (vcpus, max_vcpus)."""
    kv = parse_kv(text, "smp", ("", "cpus", "maxcpus", "sockets", "cores", "threads"))
    if "" in kv and "cpus" in kv:
        raise ConfigError("Give the CPU number once: either '-smp <n>' or '-smp cpus=<n>'.")
    nums = {key or "cpus": parse_uint(value, key or "cpus") for key, value in kv.items()}
    for key in ("sockets", "cores", "threads"):
        if key in nums and nums[key] < 1:
            raise range_error(f"The number of {key}", 1, MAX_VCPUS)
    cpus, maxcpus = nums.get("cpus"), nums.get("maxcpus")
    topology = any(key in nums for key in ("sockets", "cores", "threads"))
    if topology:
        cores, threads = nums.get("cores", 1), nums.get("threads", 1)
        sockets = nums.get("sockets")
        if sockets is None:
            base = maxcpus if maxcpus is not None else cpus if cpus is not None else cores * threads
            sockets = max(1, base // (cores * threads))
        total = sockets * cores * threads
        if maxcpus is None:
            maxcpus = total if cpus is None else cpus
        cpus = maxcpus if cpus is None else cpus
        if total != maxcpus:
            raise ConfigError(f"The topology sockets={sockets},cores={cores},threads={threads} gives {total} CPUs, "
                              f"but the max CPU number is {maxcpus}.")
    if cpus is None:
        if maxcpus is None:
            raise _missing("cpus", "smp")
        cpus = maxcpus
    maxcpus = cpus if maxcpus is None else maxcpus
    check_vcpus(cpus, maxcpus)
    return cpus, maxcpus


def parse_socket(value: str, option: str) -> str:
    """``unix:PATH[,server][,nowait]`` -> PATH (only UNIX sockets, like StratoVirt's parse_path)."""
    head, *flags = value.split(",")
    kind, sep, path = head.partition(":")
    if not sep:
        raise ConfigError(f"Failed to parse the -{option} socket '{value}': use unix:PATH.")
    if kind != "unix":
        raise ConfigError(f"{kind} type is not support yet!")
    for flag in flags:
        if flag not in ("server", "nowait"):
            raise ConfigError(f"Invalid parameter '{flag}'")
    check_socket_path(path, "QMP socket path")
    return path


def parse_drive(text: str):
    kv = parse_kv(text, "drive", ("file", "id", "readonly", "direct", "serial", "iothread", "iops"))
    if "file" not in kv:
        raise _missing("file", "drive")
    if "id" not in kv:
        raise _missing("id", "drive")
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
        raise _missing("id", "netdev")
    if "netdev" not in kv:
        raise _missing("netdev", "netdev")
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
        raise _missing("id", "chardev")
    if "path" not in kv:
        raise _missing("path", "chardev")
    return new_console(kv["id"], kv["path"])


def _parse_device(text: str):
    kv = parse_kv(text, "device", ("", "id", "guest-cid", "vhostfd"))
    if "" not in kv:
        raise ConfigError("-device needs a device type first; the only type is 'vsock'.")
    if kv[""] != "vsock":
        raise ConfigError(f"Unknown device type '{kv['']}'; the only -device type is 'vsock'.")
    if "id" not in kv:
        raise _missing("id", "vsock")
    if "guest-cid" not in kv:
        raise _missing("guest-cid", "vsock")
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

