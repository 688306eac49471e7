"""The typed, validated configuration of one micro-VM: what the machine layer builds a VM from.

This module owns the shape of a VM configuration, not its parsing: :mod:`pystratovirt.config`
turns command-line and JSON text into these objects and guarantees that every value it hands
over has been checked (ranges, string lengths, files that must exist). The machine layer only
reads them. Dataclasses are frozen (no attribute is reassigned after parsing); the lists inside
are plain lists by convention never mutated — "frozen-ish".

Disks and NICs come in two parts, as in StratoVirt 2.x and QEMU: a *backend* (the host side:
:class:`~pystratovirt.virtio.block_backend.DriveConfig`,
:class:`~pystratovirt.virtio.tap.NetdevConfig`, the same specs QMP's ``blockdev-add`` and
``netdev_add`` carry) and a *device* that puts a backend into the next replaceable slot
(:class:`BlockDeviceConfig`, :class:`NetDeviceConfig`, what QMP's ``device_add`` does). The early
command line's ``-drive``/``-netdev`` give both at once; the machine builds every boot disk and NIC
exactly as a ``blockdev-add``/``netdev_add`` followed by a ``device_add``. Consoles are the same
pair: a chardev (:class:`~pystratovirt.devices.chardev.ChardevConfig`, opened next to its
backends) and a :class:`ConsoleConfig` port on it.

Nothing here imports from above :mod:`pystratovirt.virtio` (whose backend specs these are), so
the machine, the devices and the tests can build a ``VmConfig`` by hand without the parsers.

Which command line a VM was started with is :class:`Dialect`: the parsers record it and the
front ends (the QMP server's greeting) read it; the machine builds the same VM from either.

Paths are kept exactly as the user wrote them (relative paths stay relative), because StratoVirt
does not change directory when it daemonizes and neither do we.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..devices.chardev import ChardevConfig as ChardevConfig  # re-exported: part of the vocabulary
from ..memory.layout import MEM_SIZE_MAX, MEM_SIZE_MIN, MiB
from ..virtio.block_backend import DriveConfig
from ..virtio.tap import NetdevConfig
from .slots import BLOCK_SLOTS, NET_SLOTS

# Limits shared by the parser (which enforces them) and the machine (which sizes things by them).
MAX_VCPUS = 254             # MAX_NR_CPUS: the MP table and APIC ids stop here
DEFAULT_MEM_SIZE = 256 * MiB
MIN_MEM_SIZE = MEM_SIZE_MIN
MAX_MEM_SIZE = MEM_SIZE_MAX
MAX_DRIVES = BLOCK_SLOTS    # boot disks, one per replaceable virtio-blk slot
MAX_NETS = NET_SLOTS        # boot NICs, one per replaceable virtio-net slot
MAX_IOTHREADS = 8
MAX_ID_LEN = 255            # ids, names and single kernel parameters, in UTF-8 bytes
MAX_PATH_LEN = 4096
MAX_SERIAL_LEN = 20         # virtio-blk serial (VIRTIO_BLK_ID_BYTES)
MAX_IOPS = 1_000_000
MIN_GUEST_CID = 3           # vsock: 0..2 are reserved (hypervisor, local, host)
MAX_GUEST_CID = 0xFFFF_FFFF  # exclusive: u32::MAX is VMADDR_CID_ANY
MIN_RNG_BYTES_PER_SEC = 64
MAX_RNG_BYTES_PER_SEC = 1_000_000_000


class Dialect(enum.Enum):
    """The StratoVirt command line a VM was started with, and so the QMP dialect it speaks.

    ``V0`` is early StratoVirt's (0.1-0.3: ``-api-channel``, ``-config`` JSON, ``-drive`` and
    ``-netdev`` that each make a device, a bare ``-m`` in bytes, QMP greeting major 4); ``V2`` is
    StratoVirt 2.x's, the one Kata Containers, Kuasar and hydropper send (``-qmp``, ``-object``,
    ``-device <driver>`` on a ``-drive``/``-netdev`` backend, a bare ``-m`` in MiB, greeting
    major 5). :mod:`pystratovirt.config.dialect` says which options pick which.
    """

    V0 = "0.x"
    V2 = "2.x"


@dataclass(frozen=True)
class BootSource:
    """The guest kernel, its command line (exactly as given, words joined by one space) and an initrd."""

    kernel: str
    cmdline: str = ""
    initrd: str | None = None


@dataclass(frozen=True)
class MachineConfig:
    """CPU count and guest RAM. ``max_vcpus`` > ``vcpus`` leaves offline vCPU slots (our extension)."""

    vcpus: int = 1
    max_vcpus: int | None = None   # None = same as vcpus; always an int after construction
    mem_size: int = DEFAULT_MEM_SIZE  # bytes
    mem_path: str | None = None    # file or directory (hugetlbfs) backing guest RAM
    mem_share: bool = False        # MAP_SHARED instead of MAP_PRIVATE
    dump_guest_core: bool = True   # False = MADV_DONTDUMP on guest RAM
    mem_prealloc: bool = False     # fault in all guest RAM at start (-mem-prealloc)
    type: str = "microvm"          # the only machine type

    def __post_init__(self) -> None:
        if self.max_vcpus is None:
            object.__setattr__(self, "max_vcpus", self.vcpus)


@dataclass(frozen=True)
class BlockDeviceConfig:
    """A disk in the next replaceable virtio-blk slot (the first one is vda): the backend named
    ``drive``, seen by the guest with ``serial``; ``id`` is what ``device_del`` takes."""

    id: str
    drive: str
    serial: str | None = None
    iothread: str | None = None    # run the disk's I/O on this named I/O thread


@dataclass(frozen=True)
class NetDeviceConfig:
    """A NIC in the next replaceable virtio-net slot (the first one is eth0) on the backend
    named ``netdev``; ``mac`` None means a stable generated one."""

    id: str
    netdev: str
    mac: str | None = None
    iothread: str | None = None


@dataclass(frozen=True)
class ConsoleConfig:
    """A virtio console port (``virtconsole``, port ``nr``) on the chardev named ``chardev``; the
    guest sees it as hvc<nr>. The early command line's ``-chardev id=X,path=P`` is a socket
    chardev X with a console X on it."""

    id: str
    chardev: str
    nr: int = 0


@dataclass(frozen=True)
class VsockConfig:
    """A vhost-vsock device (``-device vsock``)."""

    id: str
    guest_cid: int
    vhost_fd: int | None = None


@dataclass(frozen=True)
class SerialConfig:
    """The 16550 UART; ``stdio`` connects it to the VMM's stdin/stdout."""

    stdio: bool = False


@dataclass(frozen=True)
class BalloonConfig:
    """A virtio-balloon; ``deflate_on_oom`` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM. ``id`` (the
    2.x ``-device virtio-balloon-device,id=``) names its QOM path ``/machine/peripheral/<id>``;
    without one the path is ``/machine/peripheral/balloon``."""

    deflate_on_oom: bool = False
    id: str | None = None


@dataclass(frozen=True)
class IothreadConfig:
    """A named I/O thread that drives and nets may name in their ``iothread``."""

    id: str


@dataclass(frozen=True)
class RngConfig:
    """A virtio-rng fed from ``random_file``: at most ``max_bytes`` every ``period_ms``
    milliseconds (None: no limit; the early ``bytes_per_sec`` is max_bytes per 1000 ms)."""

    random_file: str
    max_bytes: int | None = None
    period_ms: int = 1000


@dataclass(frozen=True)
class IncomingConfig:
    """Start from the snapshot in directory ``path`` (``-incoming file:DIR``) instead of booting
    the kernel afresh."""

    path: str


@dataclass(frozen=True)
class RunWithConfig:
    """``-run-with chroot=DIR,user=UID:GID[,caps=NAME:NAME]`` (QEMU's option; ``caps`` is ours):
    once the VM is built and its files, /dev/kvm and sockets are open, the VMM chroots into
    ``chroot``, becomes ``uid``/``gid`` and keeps only ``keep_caps`` (none by default)."""

    chroot: str | None = None
    uid: int | None = None
    gid: int | None = None
    keep_caps: tuple[str, ...] = ()


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to build and run one micro-VM.

    ``log_file``: None = no ``-D`` (errors go to stderr only), "" = ``-D`` without a value (log to
    stderr), otherwise a path. ``qmp_socket`` None = no management socket (StratoVirt requires
    one; pystratovirt makes it optional). ``extract_payload`` (``-machine kernel-extract=on|off``,
    our extension): for a bzImage, decompress the kernel payload on the host (True) or boot the
    image's own decompressor (False). ``dialect``: which command line the VM was started with
    (the QMP server greets in the same dialect). ``uuid`` (``-uuid``): the VM's UUID in canonical
    lower-case form. ``incoming``: restore from a snapshot instead of booting.
    """

    boot: BootSource
    name: str = "StratoVirt"
    machine: MachineConfig = field(default_factory=MachineConfig)
    drives: list[DriveConfig] = field(default_factory=list)
    netdevs: list[NetdevConfig] = field(default_factory=list)
    block_devices: list[BlockDeviceConfig] = field(default_factory=list)
    net_devices: list[NetDeviceConfig] = field(default_factory=list)
    chardevs: list[ChardevConfig] = field(default_factory=list)
    consoles: list[ConsoleConfig] = field(default_factory=list)
    vsock: VsockConfig | None = None
    serial: SerialConfig | None = None
    iothreads: list[IothreadConfig] = field(default_factory=list)
    balloon: BalloonConfig | None = None
    rng: RngConfig | None = None
    qmp_socket: str | None = None
    freeze: bool = False           # -S / -freeze: create the vCPUs paused
    daemonize: bool = False
    pidfile: str | None = None
    log_file: str | None = None
    disable_seccomp: bool = False
    run_with: RunWithConfig | None = None
    extract_payload: bool = True
    dialect: Dialect = Dialect.V0
    uuid: str | None = None
    incoming: IncomingConfig | None = None
