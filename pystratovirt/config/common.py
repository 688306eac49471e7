"""What the options both command-line dialects share mean (the same in 0.x and in 2.x).

Owns ``-name``, ``-machine``, ``-m`` (a bare number in the dialect's unit), ``-mem-path``,
``-mem-prealloc``, ``-smp``, ``-kernel``, ``-initrd``, ``-append``, ``-D``, ``-pidfile``,
``-daemonize``, ``-disable-seccomp``, ``-S``/``-freeze``, the ``unix:PATH[,server][,nowait]``
socket syntax of ``-api-channel``/``-qmp``, and StratoVirt's "'<field>' is missing for '<device>'
device." sentence. :mod:`.cmdline` (0.x) and :mod:`.cmdline2x` (2.x) apply these first.

Choices:

* ``-machine ...,kernel-extract=on|off`` (JSON: ``"machine-config": {"kernel_extract": bool}``) is
  our extension: with a bzImage, ``on`` (the default) decompresses the payload on the host and
  boots it directly, ``off`` boots the image's own decompressor.
* ``-smp`` also takes ``maxcpus=`` (offline vCPU slots; JSON ``max_vcpus``) and QEMU-style
  ``sockets=/cores=/threads=``, which must multiply to maxcpus. They are checked, not stored:
  StratoVirt's micro-VM shows the guest a fixed topology. ``-smp`` replaces both counts, so
  ``-smp 2`` over a JSON ``max_vcpus`` of 4 gives 2/2.
* The management socket is OPTIONAL: StratoVirt requires one; a VM without a management socket
  is still useful for embedding and quick tests. ``server`` and ``nowait`` may be left out (2.x
  requires both): the VMM is always the listening side and never waits for a client. An existing
  socket path is an error in both dialects: StratoVirt 0.x refuses it and 2.x removes it, which
  could take the socket of a running VM away, so we refuse.
"""

from __future__ import annotations

from ..machine.vmconfig import MAX_ID_LEN, MAX_VCPUS, IncomingConfig, RunWithConfig
from . import args as A
from .draft import Draft, check_machine_type, check_path, check_socket_path, check_vcpus
from .errors import ConfigError
from .values import check_len, parse_bool, parse_kv, parse_mem_size, parse_uint, range_error


def value_of(parsed: A.Parsed, name: str) -> str | None:
    occ = parsed.first(name)
    return None if occ is None else occ.values[0]


def apply_common(draft: Draft, parsed: A.Parsed) -> None:
    """Apply the options both dialects share, with the same meaning (``-m`` reads a bare number
    in the draft's dialect's unit)."""
    if (name := value_of(parsed, "name")) is not None:
        check_len(name, "name", MAX_ID_LEN)
        draft.name = name
    if (machine := value_of(parsed, "machine")) is not None:
        apply_machine(draft, machine)
    if (mem := value_of(parsed, "m")) is not None:
        kv = parse_kv(mem, "m", ("", "size"))
        if "" in kv and "size" in kv:
            raise ConfigError("Give the memory size once: either '-m <size>' or '-m size=<size>'.")
        draft.mem_size = parse_mem_size(kv.get("", kv.get("size", "")), draft.dialect)
    if (mem_path := value_of(parsed, "mem-path")) is not None:
        check_path(mem_path, "mem-path")
        draft.mem_path = mem_path
    if (smp := value_of(parsed, "smp")) is not None:
        draft.vcpus, draft.max_vcpus = parse_smp(smp)
    if (kernel := value_of(parsed, "kernel")) is not None:
        check_path(kernel, "kernel image path")
        draft.kernel = kernel
    if (initrd := value_of(parsed, "initrd")) is not None:
        check_path(initrd, "initrd path")
        draft.initrd = initrd
    appends = parsed.all("append")
    if appends:
        draft.cmdline = " ".join(value for occ in appends for value in occ.values)
    if (log := parsed.first("D")) is not None:
        draft.log_file = log.values[0] if log.values else ""
        if draft.log_file:
            check_path(draft.log_file, "log file path")
    if (pidfile := value_of(parsed, "pidfile")) is not None:
        check_path(pidfile, "pidfile path")
        draft.pidfile = pidfile
    draft.daemonize = draft.daemonize or bool(parsed.all("daemonize"))
    draft.mem_prealloc = draft.mem_prealloc or bool(parsed.all("mem-prealloc"))
    draft.disable_seccomp = draft.disable_seccomp or bool(parsed.all("disable-seccomp"))
    draft.freeze = draft.freeze or bool(parsed.all("freeze"))
    if (run_with := value_of(parsed, "run-with")) is not None:
        draft.run_with = parse_run_with(run_with)
    if (incoming := value_of(parsed, "incoming")) is not None:
        draft.incoming = parse_incoming(incoming)


def missing(field: str, device: str) -> ConfigError:
    return ConfigError(f"'{field}' is missing for '{device}' device.")


def apply_machine(draft: Draft, text: str) -> None:
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
            raise missing("cpus", "smp")
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


MAX_ID = 0xFFFF_FFFE  # uid_t/gid_t; (uid_t)-1 means "unchanged" to the kernel


def parse_run_with(text: str) -> RunWithConfig:
    """``chroot=DIR[,user=UID:GID|NAME][,caps=CAP_X:CAP_Y]`` (QEMU's -run-with; caps is ours)."""
    kv = parse_kv(text, "run-with", ("chroot", "user", "caps"))
    if "chroot" not in kv and "user" not in kv:
        raise ConfigError("-run-with needs chroot=DIR, user=UID:GID, or both.")
    chroot = kv.get("chroot")
    if chroot is not None:
        check_path(chroot, "chroot directory")
    uid = gid = None
    if "user" in kv:
        uid, gid = _parse_user(kv["user"])
    caps: list[str] = []
    if "caps" in kv:
        from ..util.jail import capability_number  # the jail's own table; only -run-with needs it
        for name in kv["caps"].split(":"):
            number = capability_number(name)
            if number is None:
                raise ConfigError(f"Unknown capability '{name}' in -run-with caps (use names such as CAP_NET_ADMIN).")
            canonical = name.upper() if name.upper().startswith("CAP_") else "CAP_" + name.upper()
            if canonical not in caps:
                caps.append(canonical)
    return RunWithConfig(chroot=chroot, uid=uid, gid=gid, keep_caps=tuple(caps))


def _parse_user(text: str) -> tuple[int, int]:
    """``UID:GID`` (numbers) or a user name from the password database (its uid and primary gid)."""
    if ":" in text:
        uid_text, _, gid_text = text.partition(":")
        uid, gid = parse_uint(uid_text, "user id"), parse_uint(gid_text, "group id")
        if uid > MAX_ID or gid > MAX_ID:
            raise ConfigError(f"The user and group ids in -run-with must be at most {MAX_ID}.")
        return uid, gid
    import pwd
    try:
        entry = pwd.getpwnam(text)
    except (KeyError, ValueError):
        raise ConfigError(f"Unknown user '{text}' in -run-with (give a name or UID:GID).") from None
    return entry.pw_uid, entry.pw_gid


def parse_incoming(text: str) -> IncomingConfig:
    kind, sep, path = text.partition(":")
    if kind in ("tcp", "unix") and sep:
        raise ConfigError(f"-incoming {kind}: (live migration) is not supported; only file:<dir> (a snapshot) is.")
    if kind != "file" or not sep:
        raise ConfigError(f"Invalid incoming uri {text}: use file:<snapshot directory>.")
    check_path(path, "snapshot directory")
    return IncomingConfig(path)
