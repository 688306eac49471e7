"""The typed vocabulary between QMP and the machine: requests, results, errors, events.

This module owns the values that cross the boundary between ``pystratovirt.qmp`` (which alone
knows JSON) and the machine. The QMP schema turns a validated JSON command into one of the
request dataclasses below; the machine's :class:`Executor` answers with a result dataclass (or
``None`` for an empty result) or raises :class:`MachineError`; the machine reports asynchronous
happenings by handing an event dataclass to the server's ``emit``. Backends travel as the same
specs the command line produces (:class:`~pystratovirt.virtio.block_backend.DriveConfig`,
:class:`~pystratovirt.virtio.tap.NetdevConfig`). Nothing here imports the machine itself, and
nothing here knows how a value is spelled on the wire: the field names are Python's, the JSON
key names and key order are the schema's business.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ..errors import ErrorClass as ErrorClass  # re-exported: part of the vocabulary
from ..errors import PyStratoVirtError
from ..virtio.block_backend import DriveConfig
from ..virtio.tap import NetdevConfig

# --------------------------------------------------------------------------------------------------
# Requests. All are immutable: the schema validates every argument before building one, so the
# machine can trust the types and never sees an unknown or missing argument.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QmpCapabilities:
    """``qmp_capabilities``: answered by the QMP server itself, never passed to the machine."""

    enable: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryVersion:
    """``query-version``: answered by the QMP server itself (the version the greeting announces)."""


@dataclass(frozen=True)
class QueryCommands:
    """``query-commands``: answered by the QMP server itself (qmp-shell asks for it on connect)."""


@dataclass(frozen=True)
class QueryStatus:
    """``query-status``: answered with :class:`StatusInfo`."""


@dataclass(frozen=True)
class QueryCpus:
    """``query-cpus``: answered with a list of :class:`CpuInfo`, one per online vCPU."""


@dataclass(frozen=True)
class QueryHotpluggableCpus:
    """``query-hotpluggable-cpus``: answered with a list of :class:`HotpluggableCpu`."""


@dataclass(frozen=True)
class Stop:
    """``stop``: pause every vCPU; emit :class:`StopEvent` before returning."""


@dataclass(frozen=True)
class Cont:
    """``cont``: resume every vCPU; emit :class:`ResumeEvent` before returning."""


@dataclass(frozen=True)
class Quit:
    """``quit``: emit ``ShutdownEvent(False, HOST_QMP_QUIT)``, return, then stop the loop."""


@dataclass(frozen=True)
class BlockdevAdd:
    """``blockdev-add``: open the disk image ``drive`` names and register it under its id (the
    node-name) for a later ``device_add``."""

    drive: DriveConfig


@dataclass(frozen=True)
class BlockdevDel:
    """``blockdev-del``: forget the block backend ``node_name``."""

    node_name: str


@dataclass(frozen=True)
class NetdevAdd:
    """``netdev_add``: open the tap ``netdev`` names (by interface name, or a descriptor the VMM
    was given) and register it under its id for a later ``device_add``. The schema guarantees
    ``ifname`` or ``fds``."""

    netdev: NetdevConfig


@dataclass(frozen=True)
class NetdevDel:
    """``netdev_del``: forget the net backend ``id``."""

    id: str


@dataclass(frozen=True)
class DeviceAdd:
    """``device_add``: put a registered backend into a replaceable slot as device ``id``.

    The backend is the one named by ``drive`` (a disk's node-name) or ``netdev`` (a NIC's
    backend id) when the client gives it, as QEMU and StratoVirt 2.x clients do (Kuasar's device
    id differs from its drive's), else the one registered under ``id`` (StratoVirt's rule).
    ``addr`` is the client's ``"0xN"`` or decimal ``"N"`` already parsed to an int; ``lun`` is the
    alternative spelling kept for QMP compatibility (see :attr:`slot`). ``serial`` is a disk's
    serial number; ``mac`` the NIC's address as the client wrote it (a slot's MAC is fixed when
    the VM is built, as in StratoVirt, so the machine does not apply it).
    """

    id: str
    driver: str
    addr: int | None = None
    lun: int | None = None
    drive: str | None = None
    netdev: str | None = None
    serial: str | None = None
    mac: str | None = None

    @property
    def backend_id(self) -> str:
        """The id of the registered backend this device takes."""
        return self.drive or self.netdev or self.id

    @property
    def slot(self) -> int:
        """The replaceable slot: ``addr`` if given, else ``lun + 1`` (lun 0 is vdb), else 0."""
        if self.addr is not None:
            return self.addr
        if self.lun is not None:
            return self.lun + 1
        return 0


@dataclass(frozen=True)
class DeviceDel:
    """``device_del``: empty the slot holding ``id``; emit :class:`DeviceDeletedEvent` first."""

    id: str


@dataclass(frozen=True)
class Balloon:
    """``balloon``: set the guest's target memory size to ``value`` bytes."""

    value: int


@dataclass(frozen=True)
class QueryBalloon:
    """``query-balloon``: answered with :class:`BalloonInfo`."""


@dataclass(frozen=True)
class QomGet:
    """``qom-get``: read ``property`` of the object at ``path``. The micro-VM's object tree
    answers for the balloon only (:data:`BALLOON_QOM_PATH`): ``guest-stats`` (answered with
    :class:`BalloonGuestStats`) and ``guest-stats-polling-interval`` (an int, seconds)."""

    path: str
    property: str


@dataclass(frozen=True)
class QomSet:
    """``qom-set``: write ``property`` of the object at ``path``; only the balloon's
    ``guest-stats-polling-interval`` is writable. ``value`` is whatever scalar the client sent:
    the machine checks it against the property."""

    path: str
    property: str
    value: object


@dataclass(frozen=True)
class GetFd:
    """``getfd``: hold ``fd`` (received in SCM_RIGHTS with the command) under ``fdname``.

    The QMP server fills in ``fd``; from the moment the machine receives the request it owns the
    descriptor, whatever the outcome (a refusal closes it). ``None`` never reaches the machine.
    """

    fdname: str
    fd: int | None = None


@dataclass(frozen=True)
class CloseFd:
    """``closefd``: close the descriptor held under ``fdname``."""

    fdname: str


@dataclass(frozen=True)
class Migrate:
    """``migrate {"uri":"file:DIR"}``: save a snapshot of the paused VM into directory ``path``
    (StratoVirt 2.x). The schema accepts only ``file:`` URIs; live migration is not offered."""

    path: str


@dataclass(frozen=True)
class QueryMigrate:
    """``query-migrate``: answered with :class:`MigrationInfo`."""


#: Where qom-get/qom-set find the balloon: QEMU's path for ``-device virtio-balloon-device,id=balloon``
#: (StratoVirt's ``-balloon`` has no id; this is the one path we answer to, see docs/compatibility.md).
BALLOON_QOM_PATH = "/machine/peripheral/balloon"


Request = (
    QmpCapabilities | QueryVersion | QueryCommands | QueryStatus | QueryCpus | QueryHotpluggableCpus
    | Stop | Cont | Quit | BlockdevAdd | BlockdevDel | NetdevAdd | NetdevDel | DeviceAdd | DeviceDel
    | Balloon | QueryBalloon | QomGet | QomSet | GetFd | CloseFd | Migrate | QueryMigrate
)

# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


class RunState(enum.Enum):
    """The VM run states query-status reports (QEMU's RunState names)."""

    PRELAUNCH = "prelaunch"  # created with -S, never started
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"
    DEBUG = "debug"


@dataclass(frozen=True)
class StatusInfo:
    """The answer to query-status.

    ``running`` is derived from ``status`` so it cannot lie: early StratoVirt answered
    ``running: true`` while paused, which QEMU and later StratoVirt do not; we report the truth.
    """

    status: RunState
    singlestep: bool = False

    @property
    def running(self) -> bool:
        return self.status is RunState.RUNNING


@dataclass(frozen=True)
class CpuProps:
    """A vCPU's place in the topology (StratoVirt: one socket per vCPU, one core, one thread)."""

    socket_id: int
    core_id: int = 0
    thread_id: int = 0


@dataclass(frozen=True)
class CpuInfo:
    """One element of query-cpus."""

    cpu_index: int
    props: CpuProps
    qom_path: str
    thread_id: int  # the host thread id (gettid) of the vCPU thread
    arch: str = "x86"
    current: bool = True
    halted: bool = False


@dataclass(frozen=True)
class HotpluggableCpu:
    """One element of query-hotpluggable-cpus; ``qom_path`` is None for an offline vCPU."""

    props: CpuProps
    qom_path: str | None
    type: str = "host-x86-cpu"
    vcpus_count: int = 1


@dataclass(frozen=True)
class BalloonInfo:
    """The answer to query-balloon: the guest's current memory size in bytes."""

    actual: int


@dataclass(frozen=True)
class BalloonGuestStats:
    """The balloon's ``guest-stats``: what the guest's driver last reported through the
    statistics queue. ``values`` maps the spec's statistic names (``free-memory``,
    ``total-memory``, ... as virtio.balloon.STAT_NAMES spells them; sizes in bytes) to numbers,
    holding only those the guest sent; ``last_update`` is when they arrived (seconds since the
    epoch, 0 when the guest never reported)."""

    last_update: int
    values: Mapping[str, int]


class MigrationStatus(enum.Enum):
    """The state of the last ``migrate`` (QEMU's MigrationStatus names, StratoVirt's subset)."""

    NONE = "none"            # no migrate yet
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class MigrationRam:
    """``ram`` of query-migrate for a saved snapshot: ``total`` bytes of guest RAM, of which
    ``normal`` pages (``normal_bytes``) held data and were written to the memory file and
    ``duplicate`` pages were all zero and left as holes (QEMU's names for those counts)."""

    transferred: int
    remaining: int
    total: int
    duplicate: int
    normal: int
    normal_bytes: int


@dataclass(frozen=True)
class MigrationInfo:
    """The answer to query-migrate: ``total_time_ms`` and ``ram`` once a snapshot completed,
    ``error_desc`` when it failed."""

    status: MigrationStatus
    total_time_ms: int | None = None
    ram: MigrationRam | None = None
    error_desc: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    """The emulated QEMU version, as the greeting and query-version announce it."""

    major: int
    minor: int
    micro: int
    package: str = ""


@dataclass(frozen=True)
class CommandInfo:
    """One element of query-commands."""

    name: str


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class MachineError(PyStratoVirtError):
    """A request the machine refused; becomes ``{"error":{"class":...,"desc":...}}``.

    Any :class:`~pystratovirt.errors.PyStratoVirtError` a handler lets through (a backend that
    cannot be opened, a tap that is busy) is answered the same way; this class is for refusals
    the machine itself decides."""


# --------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------


class ShutdownReason(enum.Enum):
    """Why the VM shut down (QEMU's ShutdownCause names)."""

    HOST_QMP_QUIT = "host-qmp-quit"
    HOST_SIGNAL = "host-signal"
    GUEST_SHUTDOWN = "guest-shutdown"
    GUEST_RESET = "guest-reset"
    HOST_UI = "host-ui"  # Ctrl-A x on the serial console, as QEMU names it


@dataclass(frozen=True)
class ShutdownEvent:
    """SHUTDOWN: the VMM is about to exit (StratoVirt never reboots a guest)."""

    guest: bool
    reason: ShutdownReason


@dataclass(frozen=True)
class StopEvent:
    """STOP: the vCPUs were paused."""


@dataclass(frozen=True)
class ResumeEvent:
    """RESUME: the vCPUs run again."""


@dataclass(frozen=True)
class DeviceDeletedEvent:
    """DEVICE_DELETED: a replaceable slot was emptied by device_del."""

    device: str
    path: str  # StratoVirt sends the device id here too


@dataclass(frozen=True)
class BalloonChangedEvent:
    """BALLOON_CHANGED: the guest's memory size (bytes) after a balloon change."""

    actual: int


class IoOperation(enum.Enum):
    """The kind of block request that failed (QEMU's IoOperationType names)."""

    READ = "read"
    WRITE = "write"


class BlockErrorAction(enum.Enum):
    """What the VMM did about a block I/O error (QEMU's BlockErrorAction names)."""

    IGNORE = "ignore"
    REPORT = "report"  # the guest got the error (VIRTIO_BLK_S_IOERR)
    STOP = "stop"


@dataclass(frozen=True)
class BlockIoErrorEvent:
    """BLOCK_IO_ERROR: a disk request failed on the host, as QEMU 7.2 reports it.

    ``device`` is the block backend's name (QEMU sends "" for a backend made by blockdev-add,
    with ``node_name`` set); ``node_name`` and ``nospace`` are left out of the event when None;
    ``nospace`` is true when the error was ENOSPC; ``reason`` is the host's error text.
    """

    device: str
    node_name: str | None
    operation: IoOperation
    action: BlockErrorAction
    nospace: bool | None
    reason: str


Event = (ShutdownEvent | StopEvent | ResumeEvent | DeviceDeletedEvent | BalloonChangedEvent
         | BlockIoErrorEvent)

# --------------------------------------------------------------------------------------------------
# The machine's side of the contract
# --------------------------------------------------------------------------------------------------


class Executor(Protocol):
    """What the QMP server calls; the machine implements it.

    ``execute`` runs on the control loop's thread. It returns a result dataclass, a list of them,
    or None (sent as ``{}``), or raises :class:`MachineError`. Events it emits (through the
    server's ``emit``) while it runs are written before its reply.
    """

    def execute(self, request: Request) -> object: ...


class EventSink(Protocol):
    """What the machine calls to report an event (the QMP server implements it)."""

    def emit(self, event: Event) -> None: ...
