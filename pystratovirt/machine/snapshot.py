"""Snapshots of a whole micro-VM: what one holds (:class:`MachineState`), saving a paused machine
into a directory (QMP ``migrate {"uri":"file:DIR"}``), reading one back and checking it against a
new configuration, and restoring a new machine from it (``-incoming file:DIR``).

A snapshot directory holds two files (``docs/snapshot.md`` documents them):

* ``memory``: guest RAM in the host mapping's layout, all-zero pages left as holes. A restored
  VM maps it MAP_PRIVATE (copy-on-write): nothing is read up front, and every VM restored from
  the same snapshot shares the pages it has not written. Saving therefore never changes a memory
  file in place: it writes a new file and renames it over the old one, so VMs still running from
  the old file keep their inode.
* ``state``: one :class:`MachineState` in :mod:`.snapshot_format`'s encoding -- the
  configuration the VM was started with, the RAM size, every vCPU's and the in-kernel devices'
  state (``pystratovirt.cpu.state``'s encodings), the UART, the ACPI sleep registers, every
  virtio-mmio window's transport and device state, and the replaceable slots.

Saving (:func:`save`) needs the VM paused (the vCPUs parked with their last exit completed) and
holds every device still while it captures the state and writes the memory
(:meth:`MmioDevices.quiesced`), so the two agree. Chains a device had popped but not completed
are given back to their rings in the saved state (see ``SplitQueue.save_state``); the live VM is
not changed and may continue.

Restoring: :func:`load` reads and checks the files; :func:`check_config` compares the snapshot
with the new command line (memory, vCPUs, the balloon, the rng and the number of consoles, and
every disk and NIC the command line names: same slot, id, serial, read-only setting, MAC); the
machine builds itself as for a boot but with RAM mapped from the memory file and no kernel
loaded; then :func:`restore` loads the
in-kernel devices and vCPUs, reopens every registered backend -- the command line's spec where it
names the same id (a clone may use its own disk copy or tap), else the snapshot's (disks and NICs
hot-plugged before the snapshot) -- puts them back in their slots, and restores every device.
Every failure is a :class:`SnapshotError` with one sentence, raised before any vCPU runs.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from .. import __version__
from ..cpu.state import StateFormatError, StateRestoreError, VcpuState, VmKernelState
from ..devices.acpi_pm import AcpiPmState
from ..devices.serial import SerialState
from ..errors import PyStratoVirtError
from ..memory import GuestMemory
from ..memory.layout import PAGE_SIZE
from ..virtio.balloon import BalloonState
from ..virtio.blk import BlkState, VirtioBlk
from ..virtio.block_backend import DriveConfig
from ..virtio.console import ConsoleState
from ..virtio.mmio import MmioState
from ..virtio.net import NetState, format_mac
from ..virtio.queue import QueueError
from ..virtio.rng import RngState
from ..virtio.tap import NetdevConfig
from . import requests as rq
from .mmio_devices import window_index
from .slots import OccupantState, SlotKind, SlotsState
from .snapshot_format import Codec, SnapshotError, pack_state, read_state_file, unpack_state, write_state_file
from .vmconfig import MachineConfig, VmConfig

if TYPE_CHECKING:
    from .microvm import MicroVm

log = logging.getLogger(__name__)

STATE_FILE = "state"
MEMORY_FILE = "memory"


#: What a virtio device's ``save_state`` returns (each device's own state value).
DeviceState = BlkState | NetState | BalloonState | RngState | ConsoleState


@dataclass(frozen=True)
class WindowState:
    """One virtio-mmio window: its transport registers and its device's state."""

    index: int
    transport: MmioState
    device: DeviceState


@dataclass(frozen=True)
class MachineState:
    """Everything a snapshot's state file holds. ``vcpus`` and ``vm`` are the encodings of
    ``pystratovirt.cpu.state``'s VcpuState (one per vCPU, in index order) and VmKernelState;
    ``memory_size`` is the size of guest RAM and of the memory file."""

    vmm_version: str
    created: float            # time.time() when it was taken
    config: VmConfig          # the configuration the VM was started with
    memory_size: int
    vcpus: tuple[bytes, ...]
    vm: bytes
    serial: SerialState
    acpi_pm: AcpiPmState
    windows: tuple[WindowState, ...]
    slots: SlotsState


CODEC = Codec(MachineState)


@dataclass(frozen=True)
class SavedSnapshot:
    """What :func:`save` did: RAM bytes written to the memory file (pages holding data), the RAM
    size, and how long it took."""

    path: str
    memory_written: int
    memory_size: int
    seconds: float


# -- saving ----------------------------------------------------------------------------------------
def capture(machine: MicroVm) -> MachineState:
    """The machine's state; the VM must be paused and its devices quiesced."""
    assert (machine.vm is not None and machine.mmio_devices is not None and machine.memory is not None
            and machine.serial is not None and machine.acpi_pm is not None
            and machine.slots is not None)  # built
    try:
        vcpus = tuple(VcpuState.capture(vcpu, machine.msr_index_list).to_bytes() for vcpu in machine.vcpus)
        vm = VmKernelState.capture(machine.vm).to_bytes()
    except OSError as exc:
        raise SnapshotError(f"KVM refused to report the VM's state: {exc.strerror or exc}.") from exc
    windows = tuple(WindowState(w.index, w.transport.save_state(), cast(DeviceState, w.device.save_state()))
                    for w in machine.mmio_devices.windows)
    return MachineState(__version__, time.time(), machine.config, machine.memory.size, vcpus, vm,
                        machine.serial.save_state(), machine.acpi_pm.save_state(), windows,
                        machine.slots.save_state())


def save(machine: MicroVm, directory: str) -> SavedSnapshot:
    """Write a snapshot of the paused machine into ``directory`` (created if missing; an older
    snapshot there is replaced). Raises SnapshotError."""
    started = time.monotonic()
    assert machine.mmio_devices is not None and machine.memory is not None  # built
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise SnapshotError(f"Cannot save a snapshot to '{directory}': it is not a directory.") from None
    except OSError as exc:
        raise SnapshotError(f"Cannot create the snapshot directory '{directory}': {exc.strerror}.") from None
    # The disks first: their contents belong to the snapshot too, and the guest is paused.
    for w in machine.mmio_devices.windows:
        if isinstance(w.device, VirtioBlk):
            w.device.flush()
    tag = f".tmp-{os.getpid()}"
    memory_tmp = os.path.join(directory, MEMORY_FILE + tag)
    state_tmp = os.path.join(directory, STATE_FILE + tag)
    try:
        with machine.mmio_devices.quiesced():
            state = capture(machine)
            written = machine.memory.save(memory_tmp)
        _fsync_path(memory_tmp)
        write_state_file(state_tmp, pack_state(CODEC, state))
        # Memory first: a reader never finds a new state next to an older memory file for long,
        # and a crash between the two renames leaves a state whose recorded size still guards it.
        os.replace(memory_tmp, os.path.join(directory, MEMORY_FILE))
        os.replace(state_tmp, os.path.join(directory, STATE_FILE))
        _fsync_path(directory)
    except OSError as exc:
        for path in (memory_tmp, state_tmp):
            try:
                os.unlink(path)
            except OSError:
                pass
        raise SnapshotError(f"Cannot save the snapshot to '{directory}': {exc.strerror or exc}.") from exc
    except BaseException:
        for path in (memory_tmp, state_tmp):
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    seconds = time.monotonic() - started
    log.info("snapshot saved to %s in %.3f s: %d of %d bytes of RAM held data", directory, seconds,
             written, state.memory_size)
    return SavedSnapshot(directory, written, state.memory_size, seconds)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def migration_ram(saved: SavedSnapshot) -> rq.MigrationRam:
    """query-migrate's ``ram`` for a saved snapshot, in QEMU's terms (pages of 4 KiB)."""
    normal = -(-saved.memory_written // PAGE_SIZE)
    total_pages = saved.memory_size // PAGE_SIZE
    return rq.MigrationRam(transferred=saved.memory_written, remaining=0, total=saved.memory_size,
                           duplicate=max(total_pages - normal, 0), normal=normal,
                           normal_bytes=saved.memory_written)


# -- reading and checking --------------------------------------------------------------------------
def load(directory: str) -> MachineState:
    """The snapshot in ``directory``, with its memory file checked to exist and have the size the
    state records. Raises SnapshotError."""
    if not os.path.isdir(directory):
        raise SnapshotError(f"The snapshot directory '{directory}' does not exist or is not a directory.")
    state = unpack_state(CODEC, read_state_file(os.path.join(directory, STATE_FILE)))
    memory = os.path.join(directory, MEMORY_FILE)
    try:
        size = os.stat(memory).st_size
    except FileNotFoundError:
        raise SnapshotError(f"The snapshot in '{directory}' has no memory file.") from None
    except OSError as exc:
        raise SnapshotError(f"Cannot read the snapshot's memory file '{memory}': {exc.strerror}.") from None
    if size != state.memory_size:
        raise SnapshotError(f"The snapshot's memory file is {size} bytes, but its state says "
                            f"{state.memory_size}: it is truncated or from another snapshot.")
    if state.memory_size != state.config.machine.mem_size or len(state.vcpus) != state.config.machine.vcpus:
        raise SnapshotError("The snapshot's state is malformed: its RAM or vCPU count contradicts "
                            "its configuration.")
    return state


def map_memory(directory: str, size: int) -> GuestMemory:
    """The snapshot's RAM, mapped copy-on-write."""
    try:
        return GuestMemory.from_file(os.path.join(directory, MEMORY_FILE), size)
    except PyStratoVirtError as exc:
        raise SnapshotError(f"Cannot map the snapshot's memory: {exc.desc}.") from exc
    except OSError as exc:
        raise SnapshotError(f"Cannot map the snapshot's memory: {exc.strerror or exc}.") from exc


def _mib(size: int) -> str:
    return f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size} bytes"


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def check_config(state: MachineState, config: VmConfig) -> None:
    """Refuse a command line that does not describe the snapshot's machine, with one sentence
    naming the first difference."""
    old, new = state.config.machine, config.machine
    if old.mem_size != new.mem_size:
        raise SnapshotError(f"The snapshot was taken with {_mib(old.mem_size)} of memory, but the "
                            f"command line gives {_mib(new.mem_size)}.")
    if (old.vcpus, old.max_vcpus) != (new.vcpus, new.max_vcpus):
        def cpus(m: MachineConfig) -> str:
            return f"{m.vcpus} vCPU(s)" + (f" (maxcpus {m.max_vcpus})" if m.max_vcpus != m.vcpus else "")
        raise SnapshotError(f"The snapshot was taken with {cpus(old)}, but the command line gives {cpus(new)}.")
    if (state.config.balloon is None) != (config.balloon is None):
        if config.balloon is None:
            raise SnapshotError("The snapshot's VM has a balloon device, but the command line has none.")
        raise SnapshotError("The snapshot's VM has no balloon device, but the command line adds one.")
    if (config.balloon is not None and state.config.balloon is not None
            and state.config.balloon.deflate_on_oom != config.balloon.deflate_on_oom):
        raise SnapshotError("The snapshot's balloon has deflate-on-oom="
                            f"{_on_off(state.config.balloon.deflate_on_oom)}, but the command line says "
                            f"{_on_off(config.balloon.deflate_on_oom)}.")
    if (state.config.rng is None) != (config.rng is None):
        if config.rng is None:
            raise SnapshotError("The snapshot's VM has an rng device, but the command line has none.")
        raise SnapshotError("The snapshot's VM has no rng device, but the command line adds one.")
    if len(state.config.consoles) != len(config.consoles):
        raise SnapshotError(f"The snapshot's VM has {len(state.config.consoles)} console device(s), but "
                            f"the command line gives {len(config.consoles)}.")
    occupants = {(o.kind, o.slot): o for o in state.slots.occupants}
    specs = {r.id: r.spec for r in state.slots.registrations}
    windows = {w.index: w for w in state.windows}
    drives = {d.id: d for d in config.drives}
    for slot, disk in enumerate(config.block_devices):
        occupant = _same_occupant(occupants, SlotKind.BLOCK, slot, disk.id, disk.drive, "disk")
        saved_serial = dict(occupant.props).get("serial")
        if saved_serial != disk.serial:
            raise SnapshotError(f"Disk '{disk.id}' has serial {disk.serial!r} on the command line, but "
                                f"{saved_serial!r} in the snapshot.")
        spec, drive = specs.get(disk.drive), drives.get(disk.drive)
        if isinstance(spec, DriveConfig) and drive is not None and spec.read_only != drive.read_only:
            raise SnapshotError(f"Drive '{drive.id}' is {'read-only' if drive.read_only else 'read-write'} "
                                f"on the command line, but {'read-only' if spec.read_only else 'read-write'} "
                                "in the snapshot.")
    for slot, nic in enumerate(config.net_devices):
        _same_occupant(occupants, SlotKind.NET, slot, nic.id, nic.netdev, "NIC")
        window = windows.get(window_index(SlotKind.NET, slot))
        if nic.mac is not None and window is not None and isinstance(window.device, NetState):
            saved_mac = format_mac(window.device.mac)
            if saved_mac != nic.mac.lower():
                raise SnapshotError(f"NIC '{nic.id}' has MAC {nic.mac} on the command line, but "
                                    f"{saved_mac} in the snapshot.")


# -- restoring ---------------------------------------------------------------------------------------
def restore(machine: MicroVm, state: MachineState) -> None:
    """Load ``state`` into a machine built for it (same configuration shape, RAM mapped from
    the snapshot, vCPUs created but never run, I/O threads not started). Raises SnapshotError."""
    assert (machine.vm is not None and machine.mmio_devices is not None and machine.serial is not None
            and machine.acpi_pm is not None)  # built
    try:
        kernel_state = VmKernelState.from_bytes(state.vm)
        vcpu_states = [VcpuState.from_bytes(data) for data in state.vcpus]
    except StateFormatError as exc:
        raise SnapshotError(f"The snapshot's state is malformed: {exc}.") from None
    if len(vcpu_states) != len(machine.vcpus):
        raise SnapshotError(f"The snapshot has {len(vcpu_states)} vCPU(s), this machine {len(machine.vcpus)}.")
    try:
        kernel_state.restore(machine.vm)
        for vcpu, vcpu_state in zip(machine.vcpus, vcpu_states, strict=True):
            vcpu_state.restore(vcpu)
    except StateRestoreError as exc:
        raise SnapshotError(f"Cannot restore the snapshot: {exc}.") from None
    _restore_slots(machine, state.slots, machine.config)
    try:
        machine.serial.restore_state(state.serial)
        machine.acpi_pm.restore_state(state.acpi_pm)
    except ValueError as exc:
        raise SnapshotError(f"The snapshot's state is malformed: {exc}.") from None
    windows = {w.index: w for w in machine.mmio_devices.windows}
    if sorted(windows) != sorted(w.index for w in state.windows):
        raise SnapshotError("The snapshot's virtio devices are not this machine's.")
    for saved in state.windows:
        window = windows[saved.index]
        try:
            window.transport.restore_state(saved.transport, saved.device)
        except (ValueError, QueueError) as exc:
            # The device's message starts with its name.
            raise SnapshotError(f"The snapshot does not fit this machine: {_sentence(str(exc))}") from None


def _same_occupant(occupants: dict[tuple[SlotKind, int], OccupantState], kind: SlotKind, slot: int,
                   device_id: str, backend_id: str, what: str) -> OccupantState:
    """The snapshot's occupant of ``slot``, which must be the device the command line puts there."""
    occupant = occupants.get((kind, slot))
    if occupant is None:
        raise SnapshotError(f"The command line puts {what} '{device_id}' in {kind.value} slot {slot}, "
                            "which is empty in the snapshot.")
    if (occupant.device_id, occupant.registration) != (device_id, backend_id):
        raise SnapshotError(f"The command line puts {what} '{device_id}' in {kind.value} slot {slot}, "
                            f"where the snapshot has '{occupant.device_id}'.")
    return occupant


def _restore_slots(machine: MicroVm, slots: SlotsState, config: VmConfig) -> None:
    """Reopen every registered backend (the command line's spec for an id it names, else the
    snapshot's) and put each back in its slot, exactly as blockdev-add/netdev_add + device_add."""
    drives = {d.id: d for d in config.drives}
    netdevs = {n.id: n for n in config.netdevs}
    try:
        for reg in slots.registrations:
            if reg.kind is SlotKind.BLOCK:
                spec = drives.get(reg.id, reg.spec)
                if not isinstance(spec, DriveConfig):
                    raise SnapshotError(f"The snapshot's block backend '{reg.id}' is not a drive.")
                machine.execute(rq.BlockdevAdd(spec))
            else:
                spec = netdevs.get(reg.id, reg.spec)
                if not isinstance(spec, NetdevConfig):
                    raise SnapshotError(f"The snapshot's net backend '{reg.id}' is not a tap.")
                if spec is reg.spec and spec.fds:
                    # The number meant a descriptor of the old process; in this one it may be
                    # anything (adopting it would take over, and on refusal close, our own).
                    raise SnapshotError(f"The snapshot's NIC backend '{reg.id}' was a file descriptor "
                                        f"the old process was given; pass one on the command line "
                                        f"(-netdev id={reg.id},fds=N,...) to restore it.")
                machine.execute(rq.NetdevAdd(spec))
        for occ in slots.occupants:
            props = dict(occ.props)
            block = occ.kind is SlotKind.BLOCK
            switched = machine.execute(rq.DeviceAdd(
                occ.device_id, "virtio-blk-mmio" if block else "virtio-net-mmio", addr=occ.slot,
                drive=occ.registration if block else None, netdev=None if block else occ.registration,
                serial=props.get("serial") if block else None))
            assert isinstance(switched, Future)  # device_add answers later
            switched.result(0)  # the I/O threads do not run yet: each device switched at once
    except SnapshotError:
        raise
    except PyStratoVirtError as exc:
        raise SnapshotError(f"Cannot reattach the snapshot's disks and NICs: {_sentence(exc.desc)}") from exc


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."
