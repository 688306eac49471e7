"""The argv tokenizer and option table of StratoVirt's command line (util/src/arg_parser.rs).

Owns: which options exist in either dialect (0.x and 2.x share one table and one tokenizer: the
syntax of an argv is the same in both), how many values each takes, which may repeat, and the
-help / -version texts. It knows nothing about what the values mean (that is :mod:`.cmdline` and
:mod:`.cmdline2x`) or which dialect an option belongs to (:mod:`.dialect`).

Rules, as in StratoVirt: options have one dash; every following argv element that does not start
with '-' is a value of the option before it (so ``-append console=ttyS0 reboot=k`` has two values
that are later joined with a space); anything starting with '-' that is not an option, and a value
before the first option, is ``Found argument '<arg>' which wasn't expected, or isn't valid in the
context. Use '-h' or '-help' to get usage.``; an unknown argument is reported before -help is
honoured, every other check comes after it. Only the options marked repeatable may be given twice.
``-S`` and ``-freeze`` are one option; so are ``-h``/``-help`` and ``-V``/``-version``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

FLAG = "flag"          # no value
VALUE = "value"        # exactly one value
OPTIONAL = "optional"  # zero or one value
VALUES = "values"      # one or more values

USAGE_HINT = "Use '-h' or '-help' to get usage."


@dataclass(frozen=True)
class Option:
    """One command-line option. ``name`` is how errors and the parser refer to it (no dash)."""

    name: str
    kind: str
    help: str
    value_name: str = ""
    multiple: bool = False
    aliases: tuple[str, ...] = ()


OPTIONS: tuple[Option, ...] = (
    Option("name", VALUE, "set the name of the guest.", "vm_name"),
    Option("uuid", VALUE, "set the UUID of the guest (2.x)", "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"),
    Option("machine", VALUE, "selects emulated machine and set properties",
           "[type=]microvm[,dump-guest-core=on|off][,mem-share=on|off][,kernel-extract=on|off]"),
    Option("smp", VALUE, "set the number of CPUs to 'n' (default: 1)",
           "[cpus=]n[,maxcpus=m][,sockets=s][,cores=c][,threads=t]"),
    Option("m", VALUE, "configure guest RAM (bare number: bytes in 0.x, MiB in 2.x; default 256M)",
           "[size=]megs[m|M|g|G]"),
    Option("mem-prealloc", FLAG, "back all guest RAM with host memory at start"),
    Option("mem-path", VALUE, "configure file path that backs guest memory.", "filebackend file path"),
    Option("cpu", VALUE, "set CPU model and features (2.x; refused: the guest sees what KVM offers)", "model"),
    Option("config", VALUE, "Sets a config file for vmm (0.x).", "json file path"),
    Option("kernel", VALUE, "use uncompressed kernel image or bzImage", "kernel_path"),
    # StratoVirt declares -append as repeatable: all its values are joined with spaces.
    Option("append", VALUES, "use 'cmdline' as kernel command line", "kernel cmdline parameters", multiple=True),
    Option("initrd", VALUE, "use 'initrd-file' as initial ram disk", "initrd_path"),
    Option("api-channel", VALUE, "set api-channel's unixsocket path (0.x; optional here)", "unix:socket_path"),
    Option("qmp", VALUE, "set QMP's unix socket path (2.x; optional here)", "unix:socket_path,server,nowait"),
    Option("drive", VALUES, "use 'file' as a drive image (0.x: a disk; 2.x: a backend for -device)",
           "file=path,id=str[,readonly=][,direct=][,serial=][,iothread=][,iops=] | "
           "id=str,file=path[,readonly=][,direct=][,serial=][,if=none][,throttling.iops-total=]", multiple=True),
    Option("netdev", VALUES, "configure a host TAP network with ID 'str' (0.x: a NIC; 2.x: a backend for -device)",
           "[tap,]id=str,netdev=str[,mac=][,fds=][,vhost=on|off][,vhostfds=][,iothread=] | "
           "tap,id=str,ifname=str|fds=n[:m][,vhost=on|off][,vhostfds=]", multiple=True),
    Option("chardev", VALUES, "set char device for a virtio console",
           "id=str,path=socket_path | socket,id=str,path=path,server,nowait|pty,id=str|stdio,id=str|"
           "file,id=str,path=path", multiple=True),
    Option("device", VALUES, "add a device (0.x: vsock; 2.x: virtio-blk-device, virtio-net-device, "
           "virtio-balloon-device, virtio-rng-device, virtio-serial-device, virtconsole, vhost-vsock-device)",
           "vsock,id=str,guest-cid=u32[,vhostfd=] | <driver>,<properties>", multiple=True),
    Option("object", VALUES, "add an object (2.x)", "iothread,id=str | rng-random,id=str,filename=path",
           multiple=True),
    Option("global", VALUES, "set a global device property (2.x; refused: the micro-VM has no PCI bus)",
           "driver.property=value", multiple=True),
    Option("serial", VALUE, "add serial and set chardev [stdio] for it", "stdio | chardev:<id>"),
    Option("D", OPTIONAL, "output log to logfile (default stderr)", "log path"),
    Option("pidfile", VALUE, "write PID to 'file'", "pidfile path"),
    Option("daemonize", FLAG, "daemonize StratoVirt after initializing"),
    Option("disable-seccomp", FLAG, "not use seccomp sandbox for StratoVirt"),
    Option("run-with", VALUE, "after set-up, chroot to 'dir' and run as 'uid:gid' (QEMU's option)",
           "chroot=dir[,user=uid:gid][,caps=CAP_X:CAP_Y]"),
    Option("freeze", FLAG, "Freeze CPU at startup", aliases=("S",)),
    Option("incoming", VALUE, "start from the snapshot in DIR", "file:DIR"),
    Option("iothread", VALUES, "configure a iothread ID 'str' (0.x)", "id=str", multiple=True),
    Option("balloon", OPTIONAL, "add balloon device (0.x)", "deflate-on-oom=bool"),
    Option("rng", VALUE, "add rng device (0.x)", "random_file=path[,bytes_per_sec=]"),
)

HELP_SPELLINGS = ("-h", "-help")
VERSION_SPELLINGS = ("-V", "-version")

_BY_SPELLING: dict[str, Option] = {}
for _opt in OPTIONS:
    for _spelling in (_opt.name, *_opt.aliases):
        _BY_SPELLING["-" + _spelling] = _opt


@dataclass(frozen=True)
class Occurrence:
    """One appearance of an option on the command line with the values that followed it."""

    option: Option
    spelling: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Parsed:
    """The tokenized command line: ``want`` is "help", "version" or "run"."""

    want: str
    occurrences: tuple[Occurrence, ...] = ()

    def all(self, name: str) -> list[Occurrence]:
        return [occ for occ in self.occurrences if occ.option.name == name]

    def first(self, name: str) -> Occurrence | None:
        found = self.all(name)
        return found[0] if found else None


def unexpected(arg: str) -> ConfigError:
    return ConfigError(f"Found argument '{arg}' which wasn't expected, or isn't valid in the context. {USAGE_HINT}")


def tokenize(argv: list[str]) -> Parsed:
    """Split ``argv`` (without the program name) into option occurrences and check value counts."""
    raw: list[tuple[str, list[str]]] = []
    for arg in argv:
        if arg.startswith("-"):
            if arg not in _BY_SPELLING and arg not in HELP_SPELLINGS and arg not in VERSION_SPELLINGS:
                raise unexpected(arg)
            raw.append((arg, []))
        elif raw:
            raw[-1][1].append(arg)
        else:
            raise unexpected(arg)

    spellings = [spelling for spelling, _ in raw]
    if any(s in HELP_SPELLINGS for s in spellings):
        return Parsed("help")
    if any(s in VERSION_SPELLINGS for s in spellings):
        return Parsed("version")

    seen: set[str] = set()
    occurrences = []
    for spelling, values in raw:
        opt = _BY_SPELLING[spelling]
        shown = spelling[1:]
        if opt.name in seen and not opt.multiple:
            raise ConfigError(f"The argument '{shown}' was provided more than once. {USAGE_HINT}")
        seen.add(opt.name)
        if opt.kind == FLAG and values:
            raise ConfigError(f"The value '{values[0]}' is illegal for argument '{shown}'. {USAGE_HINT}")
        if opt.kind in (VALUE, VALUES) and not values:
            raise ConfigError(f"The argument '{shown}' requires a value, but none was supplied. {USAGE_HINT}")
        if opt.kind in (VALUE, OPTIONAL) and len(values) > 1:
            raise ConfigError(f"The argument '{shown}' only needs one value, but {len(values)} were given "
                              f"({' '.join(values)}). {USAGE_HINT}")
        occurrences.append(Occurrence(opt, spelling, tuple(values)))
    return Parsed("run", tuple(occurrences))


def help_text(prog: str = "stratovirt", version: str = "") -> str:
    """The -help output, laid out like StratoVirt's ArgParser::output_help."""
    lines = [f"StratoVirt {version}".rstrip(), "pystratovirt: a StratoVirt-compatible micro-VM monitor",
             "A light kvm-based hypervisor.", "USAGE:", f"    {prog} [FLAGS] [OPTIONS]", "FLAGS:",
             "    -h, -help           Prints help information",
             "    -V, -version        Prints version information"]
    options = []
    for opt in OPTIONS:
        if opt.kind == FLAG:
            spell = ", ".join(f"-{s}" for s in (*opt.aliases, opt.name))
            lines.append(f"    {spell:<20}{opt.help}")
        else:
            value = f"[<{opt.value_name}>]" if opt.kind == OPTIONAL else f"<{opt.value_name}>"
            dots = "..." if opt.kind == VALUES else ""
            head = f"        -{opt.name} {value}{dots}"
            options.append(f"{head}\n{'':48}{opt.help}" if len(head) > 46 else f"{head:<48}{opt.help}")
    lines.append("OPTIONS:")
    lines.extend(options)
    return "\n".join(lines)  # no trailing newline: callers print() it


def version_text(version: str) -> str:
    return f"StratoVirt {version}"
