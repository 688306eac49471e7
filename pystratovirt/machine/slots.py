"""Replaceable device slots: StratoVirt's hot-plug model for the virtio-mmio micro-VM.

The VM always has a fixed set of virtio-mmio devices: 6 block slots (vda..vdf) and 2 net slots
(eth0, eth1). An empty block slot is a disk of capacity 0; an empty net slot is a NIC with no tap
behind it. "Hot-plug" puts a backend into a slot and tells the guest (a configuration-change
interrupt for a disk); "unplug" takes it out again.

Backends are first registered by id (``blockdev-add``'s node-name, ``netdev_add``'s id; boot-time
drives and NICs too) in one list shared by both kinds, as in StratoVirt; ``device_add`` with the
same id then moves a registered backend into a slot, and ``device_del`` empties the slot and
forgets the registration. Every refusal is a :class:`MachineError` raised before anything
changed, with StratoVirt v0.2's error texts where it has one.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from typing import Callable, Protocol

from . import requests as rq

log = logging.getLogger(__name__)

BLOCK_SLOTS = 6
NET_SLOTS = 2


class SlotKind(enum.Enum):
    BLOCK = "block"
    NET = "net"


class SlotDevice(Protocol):
    """A device living in a slot: it takes a backend, or None to become empty."""

    def set_backend(self, backend) -> None: ...


class BackendOpenError(Exception):
    """Opening a backend failed; the message is one sentence for the user."""


@dataclass
class Registration:
    id: str
    kind: SlotKind
    spec: object            # rq.BlockdevAdd, rq.NetdevAdd, or the boot-time config
    path_key: tuple[int, int] | None = None  # (st_dev, st_ino) of a block backend's file
    slot: int | None = None  # where it is attached, if it is


class ReplaceableSlots:
    """Registrations, slot occupancy, and the add/del rules; runs on the control loop."""

    def __init__(self, block_devices: list[SlotDevice], net_devices: list[SlotDevice],
                 open_backend: Callable[[SlotKind, object], object]):
        self._devices = {SlotKind.BLOCK: block_devices, SlotKind.NET: net_devices}
        self._open = open_backend
        self._regs: dict[str, Registration] = {}
        self._occupant: dict[tuple[SlotKind, int], str] = {}

    @property
    def max_registrations(self) -> int:
        return len(self._devices[SlotKind.BLOCK]) + len(self._devices[SlotKind.NET])

    # -- registrations ----------------------------------------------------------------------------
    def register(self, reg_id: str, kind: SlotKind, spec: object, path: str | None = None) -> Registration:
        if reg_id in self._regs:
            raise rq.MachineError(f"Add the id {reg_id} repeatedly")
        if len(self._regs) >= self.max_registrations:
            raise rq.MachineError(f"The size {len(self._regs)} of replaceable configs extend the max "
                                  f"size {self.max_registrations}, id {reg_id}.")
        key = None
        if path is not None:
            key = _file_key(path)
            for other in self._regs.values():
                if other.path_key == key:
                    raise rq.MachineError(f"The file {path} is already used by {other.id}; a disk image "
                                          "(the root disk included) can be attached only once.")
        reg = Registration(reg_id, kind, spec, key)
        self._regs[reg_id] = reg
        return reg

    def adopt(self, reg_id: str, kind: SlotKind, spec: object, path: str | None, slot: int) -> None:
        """Record a backend that was put into ``slot`` when the VM was built (boot drives, NICs)."""
        reg = self.register(reg_id, kind, spec, path)
        reg.slot = slot
        self._occupant[(kind, slot)] = reg_id

    def unregister(self, reg_id: str) -> None:
        reg = self._regs.get(reg_id)
        if reg is None:
            raise rq.MachineError(f"Device {reg_id} not found", rq.ErrorClass.DEVICE_NOT_FOUND)
        if reg.slot is not None:
            raise rq.MachineError(f"{reg_id} is attached to slot {reg.slot}; remove it with "
                                  "device_del first.")
        del self._regs[reg_id]

    # -- attach / detach -------------------------------------------------------------------------
    def attach(self, reg_id: str, driver: str, slot: int) -> None:
        kind = _kind_of_driver(driver)
        if kind is None:
            raise rq.MachineError("Unsupported replaceable device type to add replaceable device, "
                                  f"id: {reg_id} driver: {driver}")
        devices = self._devices[kind]
        if not 0 <= slot < len(devices):
            name = "block" if kind is SlotKind.BLOCK else "net"
            raise rq.MachineError(f"Index {slot} is out of bounds {len(devices)} for {name} to add "
                                  "replaceable device")
        reg = self._regs.get(reg_id)
        if reg is None or reg.kind is not kind:
            raise rq.MachineError("Failed to find the configuration to add replaceable device, "
                                  f"id: {reg_id} driver: {driver}")
        if reg.slot is not None:
            raise rq.MachineError(f"{reg_id} is already attached to slot {reg.slot}.")
        if (kind, slot) in self._occupant:
            raise rq.MachineError(f"The slot {slot} is already used for adding replaceable device, "
                                  f"{self._occupant[(kind, slot)]}")
        try:
            backend = self._open(kind, reg.spec)
        except BackendOpenError as exc:
            raise rq.MachineError(str(exc)) from None
        devices[slot].set_backend(backend)
        reg.slot = slot
        self._occupant[(kind, slot)] = reg_id
        log.info("%s slot %d: attached %s", kind.value, slot, reg_id)

    def detach(self, reg_id: str) -> None:
        """Empty the slot holding ``reg_id`` and forget its registration."""
        reg = self._regs.get(reg_id)
        if reg is None or reg.slot is None:
            raise rq.MachineError(f"Device {reg_id} not found", rq.ErrorClass.DEVICE_NOT_FOUND)
        self._devices[reg.kind][reg.slot].set_backend(None)
        del self._occupant[(reg.kind, reg.slot)]
        log.info("%s slot %d: detached %s", reg.kind.value, reg.slot, reg_id)
        del self._regs[reg_id]

    def occupant(self, kind: SlotKind, slot: int) -> str | None:
        return self._occupant.get((kind, slot))

    def registrations(self) -> list[Registration]:
        return list(self._regs.values())


def _kind_of_driver(driver: str) -> SlotKind | None:
    # StratoVirt matches substrings: "virtio-blk-mmio", "virtio-blk-device", "virtio-net-mmio", ...
    if "blk" in driver:
        return SlotKind.BLOCK
    if "net" in driver:
        return SlotKind.NET
    return None


def _file_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
