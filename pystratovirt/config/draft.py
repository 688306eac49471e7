"""The configuration while it is being assembled, and the final checks that turn it into a VmConfig.

The JSON file is applied to a :class:`Draft` first, then the command line: scalar settings
overwrite what the file said, list-like devices (drives, nets, chardevs, iothreads) are appended.
Device entries are checked one by one as they are added (the same ``new_*`` constructors serve
both sources, so both give the same error sentences); :meth:`Draft.finish` then checks what can
only be judged on the whole (counts, cross references, option combinations) and the host files
(kernel, initrd, drives, rng source, sockets, pidfile) before building the frozen
:class:`~pystratovirt.machine.vmconfig.VmConfig`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from pystratovirt.machine.vmconfig import (
    DEFAULT_MEM_SIZE, MAX_DRIVES, MAX_GUEST_CID, MAX_ID_LEN, MAX_IOPS, MAX_IOTHREADS, MAX_MEM_SIZE, MAX_NETS,
    MAX_PATH_LEN, MAX_RNG_BYTES_PER_SEC, MAX_SERIAL_LEN, MAX_VCPUS, MIN_GUEST_CID, MIN_MEM_SIZE, MIN_RNG_BYTES_PER_SEC,
    BalloonConfig, BootSource, ConsoleConfig, DriveConfig, IothreadConfig, MachineConfig, NetConfig, RngConfig,
    RunWithConfig, SerialConfig, VmConfig, VsockConfig,
)
from pystratovirt.memory.layout import CMDLINE_MAX

from .errors import ConfigError
from .values import MEM_RANGE_ERROR, byte_len, check_len, check_mac, range_error

# sockaddr_un.sun_path is 108 bytes; Rust's UnixListener::bind wants room for the NUL.
MAX_UNIX_PATH = 107


def check_id(value: str, what: str) -> None:
    if not value:
        raise ConfigError(f"The {what} must not be empty.")
    check_len(value, what, MAX_ID_LEN)


def check_path(value: str, what: str) -> None:
    if not value:
        raise ConfigError(f"The {what} must not be empty.")
    if "\0" in value:
        raise ConfigError(f"The {what} must not contain a NUL character.")
    check_len(value, what, MAX_PATH_LEN)


def check_socket_path(value: str, what: str) -> None:
    check_path(value, what)
    if byte_len(value) > MAX_UNIX_PATH:
        raise ConfigError(f"The {what} '{value}' is longer than {MAX_UNIX_PATH} bytes, too long for a UNIX socket.")


def check_machine_type(value: str) -> str:
    if value.lower() != "microvm":
        raise ConfigError(f"Unrecognized machine type '{value}'; the only machine type is 'microvm'.")
    return "microvm"


def check_vcpus(vcpus: int, max_vcpus: int) -> None:
    if not 1 <= vcpus <= MAX_VCPUS:
        raise range_error("CPU number", 1, MAX_VCPUS)
    if not 1 <= max_vcpus <= MAX_VCPUS:
        raise range_error("Max CPU number", 1, MAX_VCPUS)
    if max_vcpus < vcpus:
        raise ConfigError(f"The max CPU number ({max_vcpus}) must not be less than the CPU number ({vcpus}).")


def check_kernel_cmdline(cmdline: str) -> None:
    # StratoVirt checks each parameter's value (the text after '='); a bare word is its own value.
    for word in cmdline.split(" "):
        _, sep, value = word.partition("=")
        if byte_len(value if sep else word) > MAX_ID_LEN:
            raise ConfigError(f"Input kernel params string's length must be no more than {MAX_ID_LEN}.")
    if byte_len(cmdline) > CMDLINE_MAX:
        raise ConfigError(f"The kernel command line is longer than {CMDLINE_MAX} bytes.")


def new_drive(id: str, path: str, read_only: bool, direct: bool, serial: str | None, iothread: str | None,
              iops: int | None) -> DriveConfig:
    check_id(id, "drive device id")
    check_path(path, "drive device path")
    if serial is not None:
        check_len(serial, "drive serial number", MAX_SERIAL_LEN)
    if iothread is not None:
        check_id(iothread, "iothread name")
    if iops is not None and not 0 <= iops <= MAX_IOPS:
        raise range_error("iops of block device", 0, MAX_IOPS)
    return DriveConfig(id, path, read_only, direct, serial, iothread, iops)


def new_net(id: str, tap: str, mac: str | None, vhost: bool, tap_fds: list[int], vhost_fds: list[int],
            iothread: str | None) -> NetConfig:
    check_id(id, "iface id")
    check_id(tap, "host tap name")
    if mac is not None:
        check_mac(mac)
    if iothread is not None:
        check_id(iothread, "iothread name")
    return NetConfig(id, tap, mac, vhost, list(tap_fds), list(vhost_fds), iothread)


def new_console(id: str, socket_path: str) -> ConsoleConfig:
    check_id(id, "console id")
    check_socket_path(socket_path, "console socket path")
    return ConsoleConfig(id, socket_path)


def new_vsock(id: str, guest_cid: int, vhost_fd: int | None) -> VsockConfig:
    check_id(id, "vsock id")
    if not MIN_GUEST_CID <= guest_cid < MAX_GUEST_CID:
        raise range_error("Vsock guest-cid", MIN_GUEST_CID, MAX_GUEST_CID, high_inclusive=False)
    return VsockConfig(id, guest_cid, vhost_fd)


def new_rng(random_file: str, bytes_per_sec: int | None) -> RngConfig:
    check_path(random_file, "rng random file")
    if bytes_per_sec is not None and not MIN_RNG_BYTES_PER_SEC <= bytes_per_sec <= MAX_RNG_BYTES_PER_SEC:
        raise range_error("The bytes per second of rng device", MIN_RNG_BYTES_PER_SEC, MAX_RNG_BYTES_PER_SEC)
    return RngConfig(random_file, bytes_per_sec)


def new_iothread(id: str) -> IothreadConfig:
    check_id(id, "iothread id")
    return IothreadConfig(id)


def _stat(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as err:
        raise ConfigError(f"The {what} '{path}' is not accessible: {err.strerror or err}.") from None
    except ValueError as err:  # embedded NUL, unencodable surrogates
        raise ConfigError(f"The {what} '{path}' is not a valid path: {err}.") from None


def _check_regular_file(path: str, what: str) -> None:
    if not stat.S_ISREG(_stat(path, what).st_mode):
        raise ConfigError(f"The {what} '{path}' is not a regular file.")


def _check_absent(path: str, message: str) -> None:
    try:
        exists = os.path.lexists(path)
    except ValueError:
        exists = False
    if exists:
        raise ConfigError(message)


@dataclass
class Draft:
    """Settings gathered so far; None means "not given" so that later sources can tell what to override."""

    name: str | None = None
    kernel: str | None = None
    cmdline: str | None = None
    initrd: str | None = None
    vcpus: int | None = None
    max_vcpus: int | None = None
    mem_size: int | None = None
    mem_path: str | None = None
    mem_prealloc: bool = False
    mem_share: bool | None = None
    dump_guest_core: bool | None = None
    extract_payload: bool | None = None
    drives: list[DriveConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    consoles: list[ConsoleConfig] = field(default_factory=list)
    iothreads: list[IothreadConfig] = field(default_factory=list)
    vsock: VsockConfig | None = None
    serial: SerialConfig | None = None
    balloon: BalloonConfig | None = None
    rng: RngConfig | None = None
    qmp_socket: str | None = None
    freeze: bool = False
    daemonize: bool = False
    pidfile: str | None = None
    log_file: str | None = None
    disable_seccomp: bool = False
    run_with: RunWithConfig | None = None

    # -- adding devices (ids are checked as they come, from either source) ---------------------

    def add_drive(self, drive: DriveConfig) -> None:
        # Boot drives and nets fill replaceable slots whose ids share one namespace (QMP device_del).
        if any(d.id == drive.id for d in self.drives) or any(n.id == drive.id for n in self.nets):
            raise ConfigError(f"The id '{drive.id}' is given to more than one drive or net.")
        self.drives.append(drive)

    def add_net(self, net: NetConfig) -> None:
        if any(d.id == net.id for d in self.drives) or any(n.id == net.id for n in self.nets):
            raise ConfigError(f"The id '{net.id}' is given to more than one drive or net.")
        self.nets.append(net)

    def add_console(self, console: ConsoleConfig) -> None:
        if any(c.id == console.id for c in self.consoles):
            raise ConfigError(f"The chardev id '{console.id}' is used more than once.")
        if any(c.socket_path == console.socket_path for c in self.consoles):
            raise ConfigError(f"The console socket path '{console.socket_path}' is used more than once.")
        self.consoles.append(console)

    def add_iothread(self, iothread: IothreadConfig) -> None:
        if any(t.id == iothread.id for t in self.iothreads):
            raise ConfigError(f"The iothread id '{iothread.id}' is used more than once.")
        if len(self.iothreads) >= MAX_IOTHREADS:
            raise range_error("Iothread number", 0, MAX_IOTHREADS)
        self.iothreads.append(iothread)

    def set_vsock(self, vsock: VsockConfig) -> None:
        if self.vsock is not None:
            raise ConfigError("Device vsock can only be set one for one StratoVirt VM.")
        self.vsock = vsock

    # -- the whole-configuration checks ---------------------------------------------------------

    def finish(self) -> VmConfig:
        """Check the combination and the host files; build the VmConfig or raise ConfigError."""
        boot = self._finish_boot()
        name = "StratoVirt" if self.name is None else self.name
        check_len(name, "name", MAX_ID_LEN)
        machine = self._finish_machine()

        if len(self.drives) > MAX_DRIVES:
            raise ConfigError(f"A maximum of {MAX_DRIVES} block devices are supported, "
                              f"but {len(self.drives)} are given.")
        if len(self.nets) > MAX_NETS:
            raise ConfigError(f"A maximum of {MAX_NETS} net devices are supported, but {len(self.nets)} are given.")
        known_iothreads = {t.id for t in self.iothreads}
        for drive in self.drives:
            self._check_iothread(drive.iothread, f"drive '{drive.id}'", known_iothreads)
            mode = _stat(drive.path, f"file of drive '{drive.id}'").st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise ConfigError(f"The file of drive '{drive.id}' ('{drive.path}') is not a regular file "
                                  "or block device.")
        for net in self.nets:
            self._check_iothread(net.iothread, f"net '{net.id}'", known_iothreads)
        for console in self.consoles:
            _check_absent(console.socket_path,
                          f"The console socket path '{console.socket_path}' already exists; remove it first.")
        if self.rng is not None:
            _stat(self.rng.random_file, "rng random file")

        serial_stdio = self.serial is not None and self.serial.stdio
        if serial_stdio and self.daemonize:
            raise ConfigError("Serial with stdio and daemonize can't be set together")
        if self.pidfile is not None:
            if not self.daemonize:
                raise ConfigError("-pidfile must be used with -daemonize together.")
            _check_absent(self.pidfile, "Pidfile path is existed yet.")
        if self.qmp_socket is not None:
            _check_absent(self.qmp_socket, f"The QMP socket path '{self.qmp_socket}' already exists; "
                                           "StratoVirt does not remove it, so remove it first.")

        return VmConfig(
            boot=boot, name=name, machine=machine, drives=list(self.drives), nets=list(self.nets),
            consoles=list(self.consoles), vsock=self.vsock, serial=self.serial, iothreads=list(self.iothreads),
            balloon=self.balloon, rng=self.rng, qmp_socket=self.qmp_socket, freeze=self.freeze,
            daemonize=self.daemonize, pidfile=self.pidfile, log_file=self.log_file,
            disable_seccomp=self.disable_seccomp, run_with=self.run_with,
            extract_payload=True if self.extract_payload is None else self.extract_payload,
        )

    def _finish_boot(self) -> BootSource:
        if self.kernel is None:
            raise ConfigError("No kernel image is given: use -kernel, or 'kernel_image_path' in the "
                              "'boot-source' of the -config file.")
        check_path(self.kernel, "kernel image path")
        _check_regular_file(self.kernel, "kernel image")
        cmdline = self.cmdline or ""
        check_kernel_cmdline(cmdline)
        if self.initrd is not None:
            check_path(self.initrd, "initrd path")
            _check_regular_file(self.initrd, "initrd")
        return BootSource(self.kernel, cmdline, self.initrd)

    def _finish_machine(self) -> MachineConfig:
        vcpus = 1 if self.vcpus is None else self.vcpus
        max_vcpus = vcpus if self.max_vcpus is None else self.max_vcpus
        check_vcpus(vcpus, max_vcpus)
        mem_size = DEFAULT_MEM_SIZE if self.mem_size is None else self.mem_size
        if not MIN_MEM_SIZE <= mem_size <= MAX_MEM_SIZE:  # both sources check already; keep the invariant here
            raise ConfigError(MEM_RANGE_ERROR)
        if self.mem_path is not None:
            check_path(self.mem_path, "mem-path")
        return MachineConfig(
            vcpus=vcpus, max_vcpus=max_vcpus, mem_size=mem_size, mem_path=self.mem_path,
            mem_share=bool(self.mem_share), dump_guest_core=self.dump_guest_core is not False,
            mem_prealloc=self.mem_prealloc,
        )

    @staticmethod
    def _check_iothread(name: str | None, owner: str, known: set[str]) -> None:
        if name is not None and name not in known:
            raise ConfigError(f"The iothread '{name}' of {owner} is not defined; add it with -iothread id={name}.")
