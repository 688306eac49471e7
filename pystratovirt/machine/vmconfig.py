"""The typed, validated configuration of one micro-VM: what the machine layer builds a VM from.

This module owns the shape of a VM configuration, not its parsing: :mod:`pystratovirt.config`
turns command-line and JSON text into these objects and guarantees that every value it hands
over has been checked (ranges, string lengths, files that must exist). The machine layer only
reads them. Dataclasses are frozen (no attribute is reassigned after parsing); the lists inside
are plain lists by convention never mutated — "frozen-ish".

Nothing here imports from above :mod:`pystratovirt.memory`, so the machine, the devices and the
tests can build a ``VmConfig`` by hand without pulling in the parsers.

Paths are kept exactly as the user wrote them (relative paths stay relative), because StratoVirt
does not change directory when it daemonizes and neither do we.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pystratovirt.memory.layout import MEM_SIZE_MAX, MEM_SIZE_MIN, MiB

# Limits shared by the parser (which enforces them) and the machine (which sizes things by them).
MAX_VCPUS = 254             # MAX_NR_CPUS: the MP table and APIC ids stop here
DEFAULT_MEM_SIZE = 256 * MiB
MIN_MEM_SIZE = MEM_SIZE_MIN
MAX_MEM_SIZE = MEM_SIZE_MAX
MAX_DRIVES = 6              # replaceable virtio-blk slots (v0.1.0/v0.2.0 count; v0.3.0 cut it to 4)
MAX_NETS = 2                # replaceable virtio-net slots
MAX_IOTHREADS = 8
MAX_ID_LEN = 255            # ids, names and single kernel parameters, in UTF-8 bytes
MAX_PATH_LEN = 4096
MAX_SERIAL_LEN = 20         # virtio-blk serial (VIRTIO_BLK_ID_BYTES)
MAX_IOPS = 1_000_000
MIN_GUEST_CID = 3           # vsock: 0..2 are reserved (hypervisor, local, host)
MAX_GUEST_CID = 0xFFFF_FFFF  # exclusive: u32::MAX is VMADDR_CID_ANY
MIN_RNG_BYTES_PER_SEC = 64
MAX_RNG_BYTES_PER_SEC = 1_000_000_000


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
class DriveConfig:
    """A block device filling the next replaceable virtio-blk slot (the first one is vda)."""

    id: str
    path: str
    read_only: bool = False
    direct: bool = True            # O_DIRECT; the command line's default is on
    serial: str | None = None
    iothread: str | None = None
    iops: int | None = None        # throttle; None = unlimited


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device backed by a host tap. ``tap`` is the host interface name (``netdev=``)."""

    id: str
    tap: str
    mac: str | None = None
    vhost: bool = False            # vhost-kernel instead of the user-space data path
    tap_fds: list[int] = field(default_factory=list)    # already-open tap fds passed by the caller
    vhost_fds: list[int] = field(default_factory=list)  # already-open /dev/vhost-net fds
    iothread: str | None = None


@dataclass(frozen=True)
class ConsoleConfig:
    """A virtio-console whose host side is a UNIX socket the VMM listens on (``-chardev``)."""

    id: str
    socket_path: str


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
    """A virtio-balloon; ``deflate_on_oom`` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM."""

    deflate_on_oom: bool = False


@dataclass(frozen=True)
class IothreadConfig:
    """A named I/O thread that drives and nets may name in their ``iothread``."""

    id: str


@dataclass(frozen=True)
class RngConfig:
    """A virtio-rng fed from ``random_file``, optionally rate-limited."""

    random_file: str
    bytes_per_sec: int | None = None


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
    image's own decompressor (False).
    """

    boot: BootSource
    name: str = "StratoVirt"
    machine: MachineConfig = field(default_factory=MachineConfig)
    drives: list[DriveConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
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
