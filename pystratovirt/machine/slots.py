"""Replaceable device slots: StratoVirt's hot-plug model for the virtio-mmio micro-VM.

The VM always has a fixed set of virtio-mmio devices: :data:`BLOCK_SLOTS` block slots (vda..vdf)
and :data:`NET_SLOTS` net slots (eth0, eth1); this module is the one place that says how many.
An empty block slot is a disk of capacity 0; an empty net slot is a NIC with no tap behind it.
"Hot-plug" puts a backend into a slot and tells the guest (a configuration-change interrupt);
"unplug" takes it out again.

Backends are first *registered* by id (``blockdev-add``'s node-name, ``netdev_add``'s id), already
opened, in one list shared by both kinds, as in StratoVirt; ``device_add`` then moves a
registered backend into a slot under a device id (the backend's own id unless the request names
the backend with ``drive``/``netdev``, as QEMU's clients do), and ``device_del`` empties the slot
and forgets the registration. Boot disks and NICs go through exactly the same two steps. Every
refusal is a :class:`MachineError` raised before anything changed, with StratoVirt v0.2's error
texts where it has one. Runs on the control loop; the devices do the swap on their I/O threads.
"""

from __future__ import annotations

import enum
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from ..virtio.block_backend import DriveConfig, FileBackend
from ..virtio.tap import NetdevConfig, Tap
from . import requests as rq

log = logging.getLogger(__name__)

BLOCK_SLOTS = 6   # StratoVirt v0.1/v0.2 and the seed (v0.3 cut it to 4)
NET_SLOTS = 2

Backend = FileBackend | Tap
BackendSpec = DriveConfig | NetdevConfig


class SlotKind(enum.Enum):
    BLOCK = "block"
    NET = "net"


class SlotDevice(Protocol):
    """A device living in a slot: it takes an (opened) backend, or None to become empty; a disk
    also takes its ``serial`` as a keyword. The backend is Any here because the pairing of a
    disk with a FileBackend and a NIC with a Tap is the slot kind's (checked by
    :meth:`ReplaceableSlots.attach`), which mypy cannot express."""

    def set_backend(self, backend: Any, /) -> Future[None]: ...


@dataclass
class Registration:
    """A backend registered by id, with the spec it was opened from; owned here until a device
    takes it, then the device's."""

    id: str
    kind: SlotKind
    backend: Backend
    spec: BackendSpec


@dataclass(frozen=True)
class Occupant:
    """Which device (by id) holds which registration in a slot, with the properties it was
    attached with (a disk's ``serial``)."""

    device_id: str
    registration: Registration
    props: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class RegistrationState:
    """A registration as a value: the backend spec registered under ``id``."""

    id: str
    kind: SlotKind
    spec: BackendSpec


@dataclass(frozen=True)
class OccupantState:
    """An occupied slot as a value: device ``device_id`` holds registration ``registration``
    in ``slot`` of ``kind``, attached with ``props``."""

    kind: SlotKind
    slot: int
    device_id: str
    registration: str
    props: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class SlotsState:
    """Registrations and slot occupancy as a value (for snapshots); which backend is where, not
    the open backends themselves (the machine reopens them from the specs)."""

    registrations: tuple[RegistrationState, ...]
    occupants: tuple[OccupantState, ...]


class ReplaceableSlots:
    """Registrations, slot occupancy, and the add/del rules; runs on the control loop."""

    def __init__(self, block_devices: list[SlotDevice], net_devices: list[SlotDevice]):
        self._devices = {SlotKind.BLOCK: block_devices, SlotKind.NET: net_devices}
        self._regs: dict[str, Registration] = {}
        self._slots: dict[tuple[SlotKind, int], Occupant] = {}
        # The last occupant of each slot, kept after device_del: a disk's I/O error found just
        # before its unplug is reported after it, and still names that disk.
        self._last: dict[tuple[SlotKind, int], Occupant] = {}

    @property
    def max_registrations(self) -> int:
        return len(self._devices[SlotKind.BLOCK]) + len(self._devices[SlotKind.NET])

    # -- registrations ----------------------------------------------------------------------------
    def check_register(self, reg_id: str) -> None:
        """Refuse an id before its backend is opened (the cheap checks of :meth:`register`)."""
        if reg_id in self._regs:
            raise rq.MachineError(f"Add the id {reg_id} repeatedly")
        if len(self._regs) >= self.max_registrations:
            raise rq.MachineError(f"The size {len(self._regs)} of replaceable configs extend the max "
                                  f"size {self.max_registrations}, id {reg_id}.")

    def register(self, reg_id: str, kind: SlotKind, backend: Backend, spec: BackendSpec) -> Registration:
        """Register a backend opened from ``spec``; on refusal the caller still owns (and closes) it."""
        self.check_register(reg_id)
        if isinstance(backend, FileBackend):
            for other in self._regs.values():
                if isinstance(other.backend, FileBackend) and other.backend.identity == backend.identity:
                    raise rq.MachineError(f"The file {backend.path} is already used by {other.id}; a "
                                          "disk image (the root disk included) can be attached only once.")
        reg = Registration(reg_id, kind, backend, spec)
        self._regs[reg_id] = reg
        return reg

    def unregister(self, reg_id: str) -> None:
        """Forget an unattached backend and close it."""
        reg = self._regs.get(reg_id)
        if reg is None:
            raise rq.MachineError(f"Device {reg_id} not found", rq.ErrorClass.DEVICE_NOT_FOUND)
        where = self._slot_of(reg)
        if where is not None:
            raise rq.MachineError(f"{reg_id} is attached to slot {where[1]}; remove it with "
                                  "device_del first.")
        del self._regs[reg_id]
        reg.backend.close()

    # -- attach / detach -------------------------------------------------------------------------
    def attach(self, device_id: str, driver: str, slot: int, backend_id: str | None = None,
               **props: str | None) -> Future[None]:
        """Put the backend registered as ``backend_id`` (default: ``device_id``) into ``slot``;
        ``props`` go to the device (a disk's ``serial``; a NIC takes none, so what a client sent
        for one is dropped, as StratoVirt ignores it). The future completes once the device has
        switched (on its I/O thread)."""
        kind = _kind_of_driver(driver)
        if kind is None:
            raise rq.MachineError("Unsupported replaceable device type to add replaceable device, "
                                  f"id: {device_id} driver: {driver}")
        if kind is SlotKind.NET:
            props = {}
        devices = self._devices[kind]
        if not 0 <= slot < len(devices):
            raise rq.MachineError(f"Index {slot} is out of bounds {len(devices)} for {kind.value} to add "
                                  "replaceable device")
        reg = self._regs.get(backend_id or device_id)
        if reg is None or reg.kind is not kind:
            raise rq.MachineError("Failed to find the configuration to add replaceable device, "
                                  f"id: {device_id} driver: {driver}")
        where = self._slot_of(reg)
        if where is not None:
            raise rq.MachineError(f"{reg.id} is already attached to slot {where[1]}.")
        if (kind, slot) in self._slots:
            raise rq.MachineError(f"The slot {slot} is already used for adding replaceable device, "
                                  f"{self._slots[(kind, slot)].device_id}")
        if self.find(device_id) is not None:
            raise rq.MachineError(f"Duplicate device ID '{device_id}'")
        self._slots[(kind, slot)] = self._last[(kind, slot)] = Occupant(device_id, reg, tuple(sorted(props.items())))
        log.info("%s slot %d: attaching %s (%s)", kind.value, slot, device_id, reg.id)
        return devices[slot].set_backend(reg.backend, **props)

    def detach(self, device_id: str) -> Future[None]:
        """Empty the slot holding device ``device_id`` and forget its backend's registration
        (the device closes the backend)."""
        where = self.find(device_id)
        if where is None:
            raise rq.MachineError(f"Device {device_id} not found", rq.ErrorClass.DEVICE_NOT_FOUND)
        occupant = self._slots.pop(where)
        del self._regs[occupant.registration.id]
        log.info("%s slot %d: detaching %s", where[0].value, where[1], device_id)
        return self._devices[where[0]][where[1]].set_backend(None)

    # -- queries -----------------------------------------------------------------------------------
    def find(self, device_id: str) -> tuple[SlotKind, int] | None:
        """The (kind, slot) holding device ``device_id``."""
        for where, occupant in self._slots.items():
            if occupant.device_id == device_id:
                return where
        return None

    def occupant(self, kind: SlotKind, slot: int) -> str | None:
        """The id of the device in ``slot``, if any."""
        occupant = self._slots.get((kind, slot))
        return occupant.device_id if occupant is not None else None

    def last_occupant(self, kind: SlotKind, slot: int) -> tuple[str, str] | None:
        """(device id, backend registration id) of the device in ``slot``, or of the last one
        that was there if the slot has been emptied since; None if it never held one."""
        occupant = self._last.get((kind, slot))
        return (occupant.device_id, occupant.registration.id) if occupant is not None else None

    def registrations(self) -> list[Registration]:
        return list(self._regs.values())

    def save_state(self) -> SlotsState:
        """Registrations (in registration order) and occupied slots as a value."""
        regs = tuple(RegistrationState(r.id, r.kind, r.spec) for r in self._regs.values())
        occupants = tuple(OccupantState(kind, slot, o.device_id, o.registration.id, o.props)
                          for (kind, slot), o in sorted(self._slots.items(),
                                                        key=lambda item: (item[0][0].value, item[0][1])))
        return SlotsState(regs, occupants)

    def _slot_of(self, reg: Registration) -> tuple[SlotKind, int] | None:
        for where, occupant in self._slots.items():
            if occupant.registration is reg:
                return where
        return None

    def close(self) -> None:
        """Close the backends that no device took (the devices close their own)."""
        for reg in list(self._regs.values()):
            if self._slot_of(reg) is None:
                reg.backend.close()
        self._regs.clear()


def _kind_of_driver(driver: str) -> SlotKind | None:
    # StratoVirt matches substrings: "virtio-blk-mmio", "virtio-blk-device", "virtio-net-pci", ...
    if "blk" in driver:
        return SlotKind.BLOCK
    if "net" in driver:
        return SlotKind.NET
    return None
