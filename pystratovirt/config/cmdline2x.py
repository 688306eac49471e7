"""What each option of the StratoVirt 2.x command line means: the dialect Kata Containers, openEuler's
Kata, Kuasar and hydropper send (``-qmp unix:PATH,server,nowait``, ``-drive`` + ``-device``).

Owns the 2.x-only options and the 2.x meaning of the options the dialects spell differently;
:mod:`.common` applies the shared ones first. Backends and the devices on them are separate, as in
StratoVirt 2.x and QEMU:

* ``-drive id=,file=[,readonly=][,direct=][,serial=][,if=none][,format=raw][,throttling.iops-total=]``
  is a disk image; ``-device virtio-blk-device,drive=,id=[,serial=][,iothread=]`` puts it in the
  next block slot (vda, vdb, ... in ``-device`` order). ``serial=`` may sit on either (it is the
  disk's); the two must agree.
* ``-netdev tap,id=,ifname=NAME|fds=N[:M]|fd=N[,vhost=on|off][,vhostfd(s)=]`` is a tap;
  ``-device virtio-net-device,netdev=,id=[,mac=][,iothread=][,mq=off]`` the NIC on it (``id``
  defaults to the netdev's). ``fds``/``vhostfd`` name descriptors the VMM inherited (Kata passes
  them at 3, 4, ...).
* A ``-drive`` or ``-netdev`` no device names is registered as after QMP ``blockdev-add`` /
  ``netdev_add``, ready for a ``device_add``; each backend serves one device.
* ``-object iothread,id=`` and ``-object rng-random,id=,filename=`` with
  ``-device virtio-rng-device,rng=[,id=][,max-bytes=,period=]`` (both limits or neither; at
  least 64 and at most 10^9 bytes per second, StratoVirt's bounds).
* ``-chardev socket,id=,path=,server,nowait`` (the VMM listens; a client socket is refused),
  ``pty,id=``, ``stdio,id=``, ``file,id=,path=``; ``-device virtio-serial-device[,id=]`` with one
  ``-device virtconsole,chardev=,id=[,nr=0]`` (the micro-VM's virtio-serial has one port, as
  StratoVirt's); ``-serial stdio`` or ``-serial chardev:<id>`` of a stdio chardev. Every chardev
  and rng object must be used by a device (nothing could attach one later).
* ``-device virtio-balloon-device[,id=][,deflate-on-oom=][,free-page-reporting=off]``,
  ``-device vhost-vsock-device,id=,guest-cid=[,vhostfd=]``, ``-uuid``, ``-incoming file:DIR``.

What the micro-VM cannot do is refused with one sentence naming it, never accepted and ignored:
PCI drivers (``virtio-*-pci``, ``vfio-pci``, ...), ``vhost-user-fs-device`` (virtio-fs),
``virtserialport``, ``free-page-reporting=on``, ``mq=on``, ``bootindex=`` (there is no firmware to
read a boot order), ``if=pflash``, ``format=qcow2``, memory-backend objects, ``-global``, ``-cpu``,
``-incoming tcp:/unix:``. Error texts are StratoVirt 2.3's where it has a clear one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..machine.vmconfig import (
    MAX_RNG_BYTES_PER_SEC,
    MAX_SERIAL_LEN,
    MIN_RNG_BYTES_PER_SEC,
    BalloonConfig,
    ChardevConfig,
    ConsoleConfig,
    RngConfig,
    SerialConfig,
)
from . import args as A
from .common import apply_common, missing, parse_socket, value_of
from .draft import (
    Draft,
    check_id,
    check_path,
    check_socket_path,
    new_block_device,
    new_drive_backend,
    new_iothread,
    new_net_device,
    new_netdev_backend,
    new_vsock,
)
from .errors import ConfigError
from .values import check_len, parse_bool, parse_fd, parse_kv, parse_uint, range_error

_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")

# The micro-VM's virtio-mmio drivers and their PCI spellings (refused: there is no PCI bus).
MMIO_DRIVERS = ("virtio-blk-device", "virtio-net-device", "virtio-balloon-device", "virtio-rng-device",
                "virtio-serial-device", "virtconsole", "vhost-vsock-device")
_PCI_TWINS = {"virtio-blk-pci": "virtio-blk-device", "virtio-net-pci": "virtio-net-device",
              "virtio-balloon-pci": "virtio-balloon-device", "virtio-rng-pci": "virtio-rng-device",
              "virtio-serial-pci": "virtio-serial-device", "vhost-vsock-pci": "vhost-vsock-device"}
_REFUSED_DRIVERS = {
    "vhost-user-fs-device": "virtio-fs shared directories are not supported by this VMM; share files "
                            "through a disk image (-drive) instead",
    "vhost-user-fs-pci": "virtio-fs shared directories are not supported by this VMM, and the micro-VM has "
                         "no PCI bus",
    "vhost-user-blk-device": "vhost-user block devices are not supported by this VMM; use -drive with "
                             "virtio-blk-device",
    "vhost-user-blk-pci": "vhost-user block devices are not supported by this VMM, and the micro-VM has no "
                          "PCI bus",
    "virtserialport": "only console ports are supported on the virtio-serial device; use virtconsole",
}


@dataclass
class _Uses:
    """Which device took which backend, so that each backend serves one device."""

    drives: dict[str, str] = field(default_factory=dict)
    netdevs: dict[str, str] = field(default_factory=dict)
    chardevs: dict[str, str] = field(default_factory=dict)
    rng_objects: dict[str, str] = field(default_factory=dict)


class _Builder:
    """The state of one 2.x command line while its options are applied to a Draft."""

    def __init__(self, draft: Draft):
        self.draft = draft
        self.uses = _Uses()
        self.drive_serials: dict[str, str] = {}
        self.rng_objects: dict[str, str] = {}   # id -> filename
        self.object_ids: set[str] = set()
        self.device_ids: set[str] = set()
        self.virtio_serial: str | None = None  # the virtio-serial-device's id ("" without one)

    # -- backends ----------------------------------------------------------------------------------
    def drive(self, text: str) -> None:
        # if= decides which keys exist (StratoVirt reads it first too): pflash has unit= and format=.
        kind = next((item[3:] for item in text.split(",") if item.startswith("if=")), "none")
        if kind == "pflash":
            raise ConfigError("-drive if=pflash (firmware flash) is not supported: the micro-VM boots the "
                              "-kernel image directly.")
        if kind != "none":
            raise ConfigError(f"Unknown 'if' value '{kind}' for -drive: only 'none' (a backend for -device) "
                              "is supported.")
        kv = parse_kv(text, "drive", ("id", "file", "readonly", "direct", "serial", "if", "format",
                                      "throttling.iops-total"))
        fmt = kv.get("format", "raw")
        if fmt == "qcow2":
            raise ConfigError("-drive format=qcow2 is not supported: disk images are raw files or block devices.")
        if fmt != "raw":
            raise ConfigError(f"Unknown disk format '{fmt}' for -drive: only 'raw' is supported.")
        for key in ("id", "file"):
            if key not in kv:
                raise missing(key, "blk")
        iops = kv.get("throttling.iops-total")
        drive = new_drive_backend(
            kv["id"], kv["file"],
            read_only=parse_bool(kv["readonly"], "readonly") if "readonly" in kv else False,
            direct=parse_bool(kv["direct"], "direct") if "direct" in kv else True,
            iops=parse_uint(iops, "throttling.iops-total") if iops is not None else None)
        if "serial" in kv:
            check_len(kv["serial"], "drive serial number", MAX_SERIAL_LEN)
            self.drive_serials[drive.id] = kv["serial"]
        self.draft.add_drive(drive)

    def netdev(self, text: str) -> None:
        kind = text.split(",", 1)[0]
        if "=" in kind:
            raise ConfigError("-netdev needs a type first: -netdev tap,id=<id>,ifname=<tap> or fds=<fd>.")
        if kind == "vhost-user":
            raise ConfigError("-netdev vhost-user is not supported by this VMM; use a tap.")
        if kind != "tap":
            raise ConfigError(f"Unsupported netdev type '{kind}': only 'tap' is supported.")
        kv = parse_kv(text, "netdev", ("", "id", "ifname", "fd", "fds", "vhost", "vhostfd", "vhostfds"))
        if "id" not in kv:
            raise missing("id", "netdev")
        for one, many in (("fd", "fds"), ("vhostfd", "vhostfds")):
            if one in kv and many in kv:
                raise ConfigError(f"-netdev {kv['id']}: give {one}= or {many}=, not both.")
        fds_text = kv.get("fds", kv.get("fd"))
        if fds_text is not None and "ifname" in kv:
            raise ConfigError(f"-netdev {kv['id']}: give ifname= or fds=, not both.")
        if fds_text is None and "ifname" not in kv:
            raise ConfigError("Tap device is missing, use 'ifname' or 'fds' to configure a tap device")
        vhost = parse_bool(kv["vhost"], "vhost") if "vhost" in kv else False
        vhost_text = kv.get("vhostfds", kv.get("vhostfd"))
        if vhost_text is not None and not vhost:
            raise ConfigError("-netdev vhostfds= needs vhost=on.")
        fds = _fd_list(fds_text, "fds") if fds_text is not None else []
        vhost_fds = _fd_list(vhost_text, "vhostfds") if vhost_text is not None else []
        self.draft.add_net(new_netdev_backend(kv["id"], kv.get("ifname"), fds, vhost, vhost_fds))

    def chardev(self, text: str) -> None:
        kv = parse_kv(text, "chardev", ("", "id", "path"), flags=("server", "nowait"))
        backend = kv.get("")
        if "id" not in kv:
            raise missing("id", "chardev")
        chardev_id = kv["id"]
        check_id(chardev_id, "chardev id")
        if backend is None:
            raise missing("backend", "chardev")
        if backend not in ("socket", "pty", "stdio", "file"):
            raise ConfigError(f"Invalid parameter '{backend}' for 'chardev'")
        path = kv.get("path")
        if backend == "socket":
            if path is None:
                raise missing("path", "socket-type chardev")
            check_socket_path(path, "console socket path")
            if "server" not in kv or "nowait" not in kv:
                raise ConfigError(f"Chardev '{chardev_id}': a socket chardev needs 'server' and 'nowait': this "
                                  "VMM listens on the socket and never waits for a client.")
        else:
            for flag in ("server", "nowait"):
                if flag in kv:
                    raise ConfigError(f"Chardev of {backend}-type does not support '{flag}' argument")
            if backend == "file":
                if path is None:
                    raise missing("path", "file-type chardev")
                check_path(path, "chardev file path")
            elif path is not None:
                raise ConfigError(f"Chardev of {backend}-type does not support 'path' argument")
        self.draft.add_chardev(ChardevConfig(chardev_id, backend, path))

    def obj(self, text: str) -> None:
        kind = text.split(",", 1)[0]
        if "=" in kind:
            raise ConfigError("-object needs a type first: -object iothread,id=<id> or "
                              "-object rng-random,id=<id>,filename=<path>.")
        if kind.startswith("memory-backend-"):
            raise ConfigError(f"-object {kind} is not supported: the micro-VM's RAM is one region sized by -m "
                              "(and backed by -mem-path).")
        if kind == "iothread":
            kv = parse_kv(text, "iothread", ("", "id"))
            if "id" not in kv:
                raise missing("id", "iothread")
            self._new_object_id(kv["id"])
            self.draft.add_iothread(new_iothread(kv["id"]))
        elif kind == "rng-random":
            kv = parse_kv(text, "rng-object", ("", "id", "filename"))
            for key in ("id", "filename"):
                if key not in kv:
                    raise missing(key, "rng-object")
            check_id(kv["id"], "rng object id")
            check_path(kv["filename"], "rng random file")
            self._new_object_id(kv["id"])
            self.rng_objects[kv["id"]] = kv["filename"]
        else:
            raise ConfigError(f"Unknown object type '{kind}': the micro-VM supports iothread and rng-random.")

    def _new_object_id(self, object_id: str) -> None:
        if object_id in self.object_ids:
            raise ConfigError(f"The object id '{object_id}' is used more than once.")
        self.object_ids.add(object_id)

    # -- devices -----------------------------------------------------------------------------------
    def device(self, text: str) -> None:
        driver = text.split(",", 1)[0]
        if "=" in driver or not driver:
            raise ConfigError("-device needs a driver name first, e.g. -device virtio-blk-device,drive=<id>,id=<id>.")
        handler = _DEVICE_HANDLERS.get(driver)
        if handler is not None:
            handler(self, text)
        elif driver in _PCI_TWINS:
            raise ConfigError(f"-device {driver} is a PCI device, and the micro-VM has no PCI bus; "
                              f"use -device {_PCI_TWINS[driver]}.")
        elif driver in _REFUSED_DRIVERS:
            raise ConfigError(f"-device {driver} is not supported: {_REFUSED_DRIVERS[driver]}.")
        elif driver.endswith("-pci") or driver in ("pcie-root-port", "nec-usb-xhci", "ramfb"):
            raise ConfigError(f"-device {driver} needs a PCI bus, which the micro-VM does not have.")
        elif driver.startswith(("usb-", "scsi-")) or driver == "pvpanic":
            raise ConfigError(f"-device {driver} is not supported by the micro-VM.")
        else:
            raise ConfigError(f"Unknown device type '{driver}': the micro-VM's devices are "
                              f"{', '.join(MMIO_DRIVERS)}.")

    def _new_device_id(self, device_id: str, driver: str) -> None:
        check_id(device_id, f"{driver} id")
        if device_id in self.device_ids:
            raise ConfigError(f"The device id '{device_id}' is used more than once.")
        self.device_ids.add(device_id)

    def _take(self, table: dict[str, str], kind: str, backend_id: str, device_id: str) -> None:
        if backend_id in table:
            raise ConfigError(f"{kind} '{backend_id}' is already used by device '{table[backend_id]}'; "
                              "each backend serves one device.")
        table[backend_id] = device_id

    def blk(self, text: str) -> None:
        kv = parse_kv(text, "virtio-blk", ("", "id", "drive", "serial", "iothread", "bootindex"))
        if "drive" not in kv:
            raise missing("drive", "blk")
        if "id" not in kv:
            raise missing("id", "blk")
        if "bootindex" in kv:
            parse_uint(kv["bootindex"], "bootindex")
            raise ConfigError(f"bootindex= on '{kv['id']}' sets a firmware boot order, and the micro-VM has no "
                              "firmware: it boots -kernel directly (use root= in -append to pick the root disk).")
        drive_id = kv["drive"]
        if not any(d.id == drive_id for d in self.draft.drives):
            raise ConfigError(f"Drive '{drive_id}' of blk device '{kv['id']}' is not defined; add "
                              f"-drive id={drive_id},file=<path>.")
        serial = kv.get("serial")
        drive_serial = self.drive_serials.get(drive_id)
        if serial is not None and drive_serial is not None and serial != drive_serial:
            raise ConfigError(f"The serial of blk device '{kv['id']}' ('{serial}') differs from its drive's "
                              f"('{drive_serial}'); give it once.")
        disk = new_block_device(kv["id"], drive_id, serial if serial is not None else drive_serial,
                                kv.get("iothread"))
        self._new_device_id(disk.id, "virtio-blk-device")
        self._take(self.uses.drives, "Drive", drive_id, disk.id)
        self.draft.block_devices.append(disk)

    def net(self, text: str) -> None:
        kv = parse_kv(text, "virtio-net", ("", "id", "netdev", "mac", "iothread", "mq"))
        if "netdev" not in kv:
            raise missing("netdev", "net")
        netdev_id = kv["netdev"]
        device_id = kv.get("id", netdev_id)
        if "mq" in kv and parse_bool(kv["mq"], "mq"):
            raise ConfigError(f"mq=on on net device '{device_id}' (multi-queue) is not supported: each NIC has "
                              "one queue pair.")
        if not any(n.id == netdev_id for n in self.draft.netdevs):
            raise ConfigError(f"Netdev '{netdev_id}' of net device '{device_id}' is not defined; add "
                              f"-netdev tap,id={netdev_id},ifname=<tap>.")
        nic = new_net_device(device_id, netdev_id, kv.get("mac"), kv.get("iothread"))
        self._new_device_id(nic.id, "virtio-net-device")
        self._take(self.uses.netdevs, "Netdev", netdev_id, nic.id)
        self.draft.net_devices.append(nic)

    def balloon(self, text: str) -> None:
        kv = parse_kv(text, "virtio-balloon", ("", "id", "deflate-on-oom", "free-page-reporting"))
        if self.draft.balloon is not None:
            raise ConfigError("Only one balloon device is supported for each vm.")
        if "free-page-reporting" in kv and parse_bool(kv["free-page-reporting"], "free-page-reporting"):
            raise ConfigError("free-page-reporting=on (the guest reporting free pages) is not supported by this "
                              "VMM's balloon.")
        if "id" in kv:
            self._new_device_id(kv["id"], "virtio-balloon-device")
        deflate = parse_bool(kv["deflate-on-oom"], "deflate-on-oom") if "deflate-on-oom" in kv else False
        self.draft.balloon = BalloonConfig(deflate_on_oom=deflate, id=kv.get("id"))

    def rng(self, text: str) -> None:
        kv = parse_kv(text, "rng", ("", "id", "rng", "max-bytes", "period"))
        if "rng" not in kv:
            raise missing("rng", "rng")
        if self.draft.rng is not None:
            raise ConfigError("Only one rng device is supported for each vm.")
        device_id = kv.get("id")
        if device_id is not None:
            self._new_device_id(device_id, "virtio-rng-device")
        max_bytes = parse_uint(kv["max-bytes"], "max-bytes") if "max-bytes" in kv else None
        period = parse_uint(kv["period"], "period") if "period" in kv else None
        if max_bytes is not None and period is None:
            raise ConfigError("Argument 'period' is missing")
        if period is not None and max_bytes is None:
            raise ConfigError("Argument 'max-bytes' is missing")
        if period is not None and max_bytes is not None:  # both or neither, checked above
            if period == 0:
                raise ConfigError("Illegal period arguments: 0")
            if not MIN_RNG_BYTES_PER_SEC <= max_bytes * 1000 // period <= MAX_RNG_BYTES_PER_SEC:
                raise range_error("The bytes per second of rng device", MIN_RNG_BYTES_PER_SEC, MAX_RNG_BYTES_PER_SEC)
        object_id = kv["rng"]
        if object_id not in self.rng_objects:
            raise ConfigError(f"The rng-random object '{object_id}' is not defined; add "
                              f"-object rng-random,id={object_id},filename=/dev/urandom.")
        self._take(self.uses.rng_objects, "Object", object_id, device_id or "virtio-rng-device")
        self.draft.rng = RngConfig(self.rng_objects[object_id], max_bytes, 1000 if period is None else period)

    def virtio_serial_device(self, text: str) -> None:
        kv = parse_kv(text, "virtio-serial", ("", "id"))
        if self.virtio_serial is not None:
            raise ConfigError("Only one virtio serial device is supported")
        if "id" in kv:
            self._new_device_id(kv["id"], "virtio-serial-device")
        self.virtio_serial = kv.get("id", "")

    def virtconsole(self, text: str) -> None:
        kv = parse_kv(text, "virtserialport", ("", "id", "chardev", "nr"))
        for key in ("chardev", "id"):
            if key not in kv:
                raise missing(key, "virtserialport")
        nr = parse_uint(kv["nr"], "nr") if "nr" in kv else 0
        if nr != 0:
            raise ConfigError(f"virtio serial port nr {nr} should be less than virtio serial's max_nr_ports 1")
        if self.draft.consoles:
            raise ConfigError(f"Repetitive virtio serial port nr {nr}.")
        self._new_device_id(kv["id"], "virtconsole")
        self._take_chardev(kv["chardev"], kv["id"])
        self.draft.consoles.append(ConsoleConfig(kv["id"], kv["chardev"], nr))

    def vsock(self, text: str) -> None:
        kv = parse_kv(text, "vhost-vsock", ("", "id", "guest-cid", "vhostfd"))
        for key in ("id", "guest-cid"):
            if key not in kv:
                raise missing(key, "vsock")
        vhost_fd = parse_fd(kv["vhostfd"], "vhostfd") if "vhostfd" in kv else None
        vsock = new_vsock(kv["id"], parse_uint(kv["guest-cid"], "guest-cid"), vhost_fd)
        self._new_device_id(vsock.id, "vhost-vsock-device")
        self.draft.set_vsock(vsock)

    def _take_chardev(self, chardev_id: str, user: str) -> ChardevConfig:
        chardev = next((c for c in self.draft.chardevs if c.id == chardev_id), None)
        if chardev is None:
            raise ConfigError(f"Chardev '{chardev_id}' of '{user}' is not defined; add -chardev "
                              f"socket,id={chardev_id},path=<path>,server,nowait.")
        self._take(self.uses.chardevs, "Chardev", chardev_id, user)
        return chardev

    # -- the rest ----------------------------------------------------------------------------------
    def serial(self, text: str) -> None:
        if text == "stdio":
            self.draft.serial = SerialConfig(stdio=True)
            return
        kind, sep, chardev_id = text.partition(":")
        if kind == "chardev" and sep:
            chardev = self._take_chardev(chardev_id, "serial")
            if chardev.backend != "stdio":
                raise ConfigError(f"-serial chardev:{chardev_id}: the serial port can only be connected to stdio, "
                                  f"and chardev '{chardev_id}' is a {chardev.backend} chardev.")
            self.draft.take_chardev(chardev_id)  # the UART itself is the stdio user now
            self.draft.serial = SerialConfig(stdio=True)
            return
        raise ConfigError(f"-serial {text}: the serial port can only be connected to stdio "
                          "(-serial stdio, or -serial chardev:<id> of a stdio chardev).")

    def finish(self) -> None:
        """Every chardev and rng object used, and the console on its virtio-serial device."""
        for chardev in self.draft.chardevs:
            if chardev.id not in self.uses.chardevs:
                raise ConfigError(f"Chardev '{chardev.id}' is not used by any device; connect it with "
                                  f"-device virtconsole,chardev={chardev.id},id=<id> or remove it.")
        for object_id in self.rng_objects:
            if object_id not in self.uses.rng_objects:
                raise ConfigError(f"The rng-random object '{object_id}' is not used by any device; add "
                                  f"-device virtio-rng-device,rng={object_id} or remove it.")
        if self.draft.consoles and self.virtio_serial is None:
            raise ConfigError(f"virtconsole '{self.draft.consoles[0].id}' needs its bus: add "
                              "-device virtio-serial-device.")
        if self.virtio_serial is not None and not self.draft.consoles:
            raise ConfigError("-device virtio-serial-device has no port: add -device virtconsole,chardev=<id>,id=<id>.")


_DEVICE_HANDLERS = {
    "virtio-blk-device": _Builder.blk,
    "virtio-net-device": _Builder.net,
    "virtio-balloon-device": _Builder.balloon,
    "virtio-rng-device": _Builder.rng,
    "virtio-serial-device": _Builder.virtio_serial_device,
    "virtconsole": _Builder.virtconsole,
    "vhost-vsock-device": _Builder.vsock,
}


def _fd_list(text: str, key: str) -> list[int]:
    """``N[:M...]``: descriptors the VMM inherited, one per queue."""
    return [parse_fd(part, key) for part in text.split(":")]


def parse_uuid(text: str) -> str:
    if not _UUID.fullmatch(text):
        raise ConfigError(f"Invalid UUID '{text}': use the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx "
                          "(hexadecimal digits).")
    return text.lower()


def apply_args_2x(draft: Draft, parsed: A.Parsed) -> None:
    """Apply a 2.x command line to ``draft``: shared options, then backends, then devices (the
    order of StratoVirt's create_vmconfig, so a -device may come before its -drive)."""
    if (glob := parsed.first("global")) is not None:
        raise ConfigError(f"-global {glob.values[0]}: global device properties are not supported: they "
                          "configure PCI devices (such as pcie-root-port), and the micro-VM has no PCI bus.")
    if value_of(parsed, "cpu") is not None:
        raise ConfigError("-cpu is not supported: the guest sees the CPU model and features KVM offers on this host.")
    apply_common(draft, parsed)
    if (uuid := value_of(parsed, "uuid")) is not None:
        draft.uuid = parse_uuid(uuid)
    if (qmp := value_of(parsed, "qmp")) is not None:
        draft.qmp_socket = parse_socket(qmp, "qmp")

    build = _Builder(draft)
    for name, apply in (("drive", build.drive), ("object", build.obj), ("netdev", build.netdev),
                        ("chardev", build.chardev), ("device", build.device)):
        for occ in parsed.all(name):
            for value in occ.values:
                apply(value)
    if (serial := value_of(parsed, "serial")) is not None:
        build.serial(serial)
    build.finish()
