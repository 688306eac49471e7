"""The configuration while it is being assembled, and the final checks that turn it into a VmConfig.

Both dialects fill one :class:`Draft`. In 0.x the JSON file is applied first, then the command
line: scalar settings overwrite what the file said, list-like devices (drives, nets, chardevs,
iothreads) are appended. In 2.x backends (``-drive``, ``-netdev``, ``-chardev``) and the devices
on them (``-device``) are added separately; a backend no device names stays registered, as after
QMP's ``blockdev-add``/``netdev_add``, for a later ``device_add``.
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

from ..machine.vmconfig import (
    DEFAULT_MEM_SIZE,
    MAX_DRIVES,
    MAX_GUEST_CID,
    MAX_ID_LEN,
    MAX_IOPS,
    MAX_IOTHREADS,
    MAX_MEM_SIZE,
    MAX_NETS,
    MAX_PATH_LEN,
    MAX_RNG_BYTES_PER_SEC,
    MAX_SERIAL_LEN,
    MAX_VCPUS,
    MIN_GUEST_CID,
    MIN_MEM_SIZE,
    MIN_RNG_BYTES_PER_SEC,
    BalloonConfig,
    BlockDeviceConfig,
    BootSource,
    ChardevConfig,
    ConsoleConfig,
    Dialect,
    IncomingConfig,
    IothreadConfig,
    MachineConfig,
    NetDeviceConfig,
    RngConfig,
    RunWithConfig,
    SerialConfig,
    VmConfig,
    VsockConfig,
)
from ..memory.layout import CMDLINE_MAX
from ..virtio.block_backend import DriveConfig
from ..virtio.tap import NetdevConfig
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


def new_drive_backend(id: str, path: str, read_only: bool, direct: bool, iops: int | None) -> DriveConfig:
    """A disk image (a 2.x ``-drive``, or the backend half of a 0.x one), its fields checked."""
    check_id(id, "drive device id")
    check_path(path, "drive device path")
    if iops is not None and not 0 <= iops <= MAX_IOPS:
        raise range_error("iops of block device", 0, MAX_IOPS)
    return DriveConfig(id, path, read_only=read_only, direct=direct, iops=iops)


def new_block_device(id: str, drive: str, serial: str | None, iothread: str | None) -> BlockDeviceConfig:
    """A disk on the backend ``drive`` (a 2.x ``-device virtio-blk-device``), its fields checked."""
    check_id(id, "drive device id")
    if serial is not None:
        check_len(serial, "drive serial number", MAX_SERIAL_LEN)
    if iothread is not None:
        check_id(iothread, "iothread name")
    return BlockDeviceConfig(id, drive, serial=serial, iothread=iothread)


def new_drive(id: str, path: str, read_only: bool, direct: bool, serial: str | None, iothread: str | None,
              iops: int | None) -> tuple[DriveConfig, BlockDeviceConfig]:
    """An early-dialect drive: the disk image and the disk that puts it in the next block slot."""
    check_id(id, "drive device id")
    check_path(path, "drive device path")
    disk = new_block_device(id, id, serial, iothread)
    return new_drive_backend(id, path, read_only, direct, iops), disk


def new_netdev_backend(id: str, ifname: str | None, fds: list[int], vhost: bool,
                       vhost_fds: list[int]) -> NetdevConfig:
    """A tap by name or by inherited descriptors (a 2.x ``-netdev``, or half a 0.x one), checked."""
    check_id(id, "iface id")
    if ifname is not None:
        check_id(ifname, "host tap name")
    return NetdevConfig(id, ifname=ifname, fds=tuple(str(fd) for fd in fds), vhost=vhost,
                        vhostfds=tuple(str(fd) for fd in vhost_fds))


def new_net_device(id: str, netdev: str, mac: str | None, iothread: str | None) -> NetDeviceConfig:
    """A NIC on the backend ``netdev`` (a 2.x ``-device virtio-net-device``), its fields checked."""
    check_id(id, "iface id")
    if mac is not None:
        check_mac(mac)
    if iothread is not None:
        check_id(iothread, "iothread name")
    return NetDeviceConfig(id, netdev, mac=mac, iothread=iothread)


def new_net(id: str, tap: str, mac: str | None, vhost: bool, tap_fds: list[int], vhost_fds: list[int],
            iothread: str | None) -> tuple[NetdevConfig, NetDeviceConfig]:
    """An early-dialect NIC: the tap and the NIC that puts it in the next net slot."""
    check_id(id, "iface id")
    check_id(tap, "host tap name")
    nic = new_net_device(id, id, mac, iothread)
    return new_netdev_backend(id, tap, tap_fds, vhost, vhost_fds), nic


def new_console(id: str, socket_path: str) -> tuple[ChardevConfig, ConsoleConfig]:
    """An early-dialect console: a socket chardev and the virtio console port on it."""
    check_id(id, "console id")
    check_socket_path(socket_path, "console socket path")
    return ChardevConfig(id, "socket", socket_path), ConsoleConfig(id, id)


def new_vsock(id: str, guest_cid: int, vhost_fd: int | None) -> VsockConfig:
    check_id(id, "vsock id")
    if not MIN_GUEST_CID <= guest_cid < MAX_GUEST_CID:
        raise range_error("Vsock guest-cid", MIN_GUEST_CID, MAX_GUEST_CID, high_inclusive=False)
    return VsockConfig(id, guest_cid, vhost_fd)


def new_rng(random_file: str, bytes_per_sec: int | None) -> RngConfig:
    check_path(random_file, "rng random file")
    if bytes_per_sec is not None and not MIN_RNG_BYTES_PER_SEC <= bytes_per_sec <= MAX_RNG_BYTES_PER_SEC:
        raise range_error("The bytes per second of rng device", MIN_RNG_BYTES_PER_SEC, MAX_RNG_BYTES_PER_SEC)
    return RngConfig(random_file, bytes_per_sec)  # an early-dialect rate: that many bytes per second


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
    netdevs: list[NetdevConfig] = field(default_factory=list)
    block_devices: list[BlockDeviceConfig] = field(default_factory=list)
    net_devices: list[NetDeviceConfig] = field(default_factory=list)
    chardevs: list[ChardevConfig] = field(default_factory=list)
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
    dialect: Dialect = Dialect.V0
    uuid: str | None = None
    incoming: IncomingConfig | None = None
    run_with: RunWithConfig | None = None

    # -- adding devices (ids are checked as they come, from either source) ---------------------

    def _check_new_id(self, new_id: str) -> None:
        # Boot drives and nets fill replaceable slots whose ids share one namespace (QMP device_del).
        if any(d.id == new_id for d in self.drives) or any(n.id == new_id for n in self.netdevs):
            raise ConfigError(f"The id '{new_id}' is given to more than one drive or net.")

    def add_drive(self, drive: DriveConfig, disk: BlockDeviceConfig | None = None) -> None:
        self._check_new_id(drive.id)
        self.drives.append(drive)
        if disk is not None:
            self.block_devices.append(disk)

    def add_net(self, netdev: NetdevConfig, nic: NetDeviceConfig | None = None) -> None:
        self._check_new_id(netdev.id)
        self.netdevs.append(netdev)
        if nic is not None:
            self.net_devices.append(nic)

    def add_chardev(self, chardev: ChardevConfig) -> None:
        if any(c.id == chardev.id for c in self.chardevs):
            raise ConfigError(f"The chardev id '{chardev.id}' is used more than once.")
        if chardev.path is not None and any(c.path == chardev.path for c in self.chardevs):
            raise ConfigError(f"The console socket path '{chardev.path}' is used more than once.")
        self.chardevs.append(chardev)

    def take_chardev(self, chardev_id: str) -> ChardevConfig | None:
        """Remove and return the chardev ``chardev_id`` (a 2.x ``-serial chardev:<id>`` uses it up)."""
        for i, chardev in enumerate(self.chardevs):
            if chardev.id == chardev_id:
                return self.chardevs.pop(i)
        return None

    def add_console(self, chardev: ChardevConfig, console: ConsoleConfig) -> None:
        """An early-dialect console: its chardev and the port on it."""
        self.add_chardev(chardev)
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

        if len(self.block_devices) > MAX_DRIVES:
            raise ConfigError(f"A maximum of {MAX_DRIVES} block devices are supported, "
                              f"but {len(self.block_devices)} are given.")
        if len(self.net_devices) > MAX_NETS:
            raise ConfigError(f"A maximum of {MAX_NETS} net devices are supported, "
                              f"but {len(self.net_devices)} are given.")
        known_iothreads = {t.id for t in self.iothreads}
        for disk in self.block_devices:
            self._check_iothread(disk.iothread, f"drive '{disk.id}'", known_iothreads)
        for drive in self.drives:
            mode = _stat(drive.path, f"file of drive '{drive.id}'").st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise ConfigError(f"The file of drive '{drive.id}' ('{drive.path}') is not a regular file "
                                  "or block device.")
        for nic in self.net_devices:
            self._check_iothread(nic.iothread, f"net '{nic.id}'", known_iothreads)
        for chardev in self.chardevs:
            if chardev.backend == "socket" and chardev.path is not None:
                _check_absent(chardev.path,
                              f"The console socket path '{chardev.path}' already exists; remove it first.")
        if self.rng is not None:
            _stat(self.rng.random_file, "rng random file")

        registrations = len(self.drives) + len(self.netdevs)
        if registrations > MAX_DRIVES + MAX_NETS:
            raise ConfigError(f"A maximum of {MAX_DRIVES + MAX_NETS} drives and netdevs together are supported "
                              f"(one per replaceable slot), but {registrations} are given.")
        self._check_fds_unique()

        serial_stdio = self.serial is not None and self.serial.stdio
        stdio_users = int(serial_stdio) + sum(c.backend == "stdio" for c in self.chardevs)
        if stdio_users > 1:
            raise ConfigError("Can't set multiple devices redirected to stdio")
        if stdio_users and self.daemonize:
            raise ConfigError("Serial with stdio and daemonize can't be set together" if self.dialect is Dialect.V0
                              else "Device redirected to stdio and daemonize can't be set together")
        if self.pidfile is not None:
            if not self.daemonize:
                raise ConfigError("-pidfile must be used with -daemonize together.")
            _check_absent(self.pidfile, "Pidfile path is existed yet.")
        if self.qmp_socket is not None:
            _check_absent(self.qmp_socket, f"The QMP socket path '{self.qmp_socket}' already exists; "
                                           "StratoVirt does not remove it, so remove it first.")
        if self.incoming is not None:
            mode = _stat(self.incoming.path, "snapshot directory").st_mode
            if not stat.S_ISDIR(mode):
                raise ConfigError(f"The snapshot directory '{self.incoming.path}' is not a directory.")

        return VmConfig(
            boot=boot, name=name, machine=machine, drives=list(self.drives), netdevs=list(self.netdevs),
            block_devices=list(self.block_devices), net_devices=list(self.net_devices),
            chardevs=list(self.chardevs), consoles=list(self.consoles), vsock=self.vsock, serial=self.serial,
            iothreads=list(self.iothreads),
            balloon=self.balloon, rng=self.rng, qmp_socket=self.qmp_socket, freeze=self.freeze,
            daemonize=self.daemonize, pidfile=self.pidfile, log_file=self.log_file,
            disable_seccomp=self.disable_seccomp, run_with=self.run_with,
            extract_payload=True if self.extract_payload is None else self.extract_payload,
            dialect=self.dialect, uuid=self.uuid, incoming=self.incoming,
        )

    def _check_fds_unique(self) -> None:
        """A descriptor the VMM inherited can back one thing only: each user closes it."""
        users: dict[str, str] = {}
        named = [(ref, f"fds= of netdev '{n.id}'") for n in self.netdevs for ref in n.fds]
        named += [(ref, f"vhostfds= of netdev '{n.id}'") for n in self.netdevs for ref in n.vhostfds]
        if self.vsock is not None and self.vsock.vhost_fd is not None:
            named.append((str(self.vsock.vhost_fd), f"vhostfd= of vsock '{self.vsock.id}'"))
        for ref, user in named:
            if ref in users:
                raise ConfigError(f"File descriptor {ref} is given twice ({users[ref]} and {user}); "
                                  "pass each descriptor to one user.")
            users[ref] = user

    def _finish_boot(self) -> BootSource:
        if self.kernel is None:
            if self.dialect is Dialect.V2:
                raise ConfigError("No kernel image is given: use -kernel.")
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

    def _check_iothread(self, name: str | None, owner: str, known: set[str]) -> None:
        if name is not None and name not in known:
            option = "-iothread id=" if self.dialect is Dialect.V0 else "-object iothread,id="
            raise ConfigError(f"The iothread '{name}' of {owner} is not defined; add it with {option}{name}.")
