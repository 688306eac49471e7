"""The replaceable-slot rules (pystratovirt.machine.slots) without KVM: registrations, the
add/del checks and StratoVirt's error texts, with stand-in devices and real disk images."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from pystratovirt.machine.requests import ErrorClass, MachineError
from pystratovirt.machine.slots import BLOCK_SLOTS, NET_SLOTS, ReplaceableSlots, SlotKind
from pystratovirt.virtio.block_backend import DriveConfig, FileBackend
from pystratovirt.virtio.tap import NetdevConfig

# The specs registrations are opened from (only kept, for snapshots; these tests open nothing by them).
SPEC = {SlotKind.BLOCK: DriveConfig("d", "/dev/null"), SlotKind.NET: NetdevConfig("n", ifname="tap0")}


class FakeDevice:
    """A slot device that records what it is given (as a virtio device would on its I/O thread)."""

    def __init__(self):
        self.backend = None
        self.props = {}

    def set_backend(self, backend, **props):
        self.backend, self.props = backend, props
        done: Future = Future()
        done.set_result(None)
        return done


class FakeTap:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def slots():
    blk = [FakeDevice() for _ in range(BLOCK_SLOTS)]
    net = [FakeDevice() for _ in range(NET_SLOTS)]
    s = ReplaceableSlots(blk, net)
    s.blk, s.net = blk, net
    yield s
    s.close()


@pytest.fixture
def image(tmp_path):
    def make(name):
        path = tmp_path / name
        path.write_bytes(bytes(4096))
        return FileBackend.open(DriveConfig(name, str(path), direct=False))
    return make


def refusal(fn, *args, **kw) -> str:
    with pytest.raises(MachineError) as info:
        fn(*args, **kw)
    return info.value.desc


def test_the_seed_flow_register_attach_detach(slots, image):
    disk = image("a.img")
    slots.register("drive-0", SlotKind.BLOCK, disk, SPEC[SlotKind.BLOCK])
    slots.attach("drive-0", "virtio-blk-mmio", 1, serial="SN").result()
    assert slots.blk[1].backend is disk and slots.blk[1].props == {"serial": "SN"}
    assert slots.occupant(SlotKind.BLOCK, 1) == "drive-0" and slots.find("drive-0") == (SlotKind.BLOCK, 1)
    slots.detach("drive-0").result()
    assert slots.blk[1].backend is None and slots.registrations() == []
    # device_del forgot the registration: the same id may be added again.
    slots.register("drive-0", SlotKind.BLOCK, image("b.img"), SPEC[SlotKind.BLOCK])


def test_a_device_id_other_than_the_backend_id(slots, image):
    slots.register("drive-0", SlotKind.BLOCK, image("a.img"), SPEC[SlotKind.BLOCK])
    slots.attach("virtio-drive-0", "virtio-blk-pci", 2, backend_id="drive-0")
    assert slots.occupant(SlotKind.BLOCK, 2) == "virtio-drive-0"
    assert refusal(slots.detach, "drive-0") == "Device drive-0 not found"
    slots.detach("virtio-drive-0")
    assert slots.registrations() == []


def test_net_slots_take_net_backends(slots):
    tap = FakeTap()
    slots.register("net-0", SlotKind.NET, tap, SPEC[SlotKind.NET])
    slots.attach("net-0", "virtio-net-mmio", 0)
    assert slots.net[0].backend is tap and slots.blk[0].backend is None
    assert refusal(slots.attach, "net-0", "virtio-blk-mmio", 0).startswith("Failed to find the configuration")


@pytest.mark.parametrize("driver, slot, text", [
    ("virtio-scsi", 1, "Unsupported replaceable device type to add replaceable device, id: d driver: virtio-scsi"),
    ("virtio-blk-mmio", BLOCK_SLOTS, f"Index {BLOCK_SLOTS} is out of bounds {BLOCK_SLOTS} for block to add "
                                     "replaceable device"),
    ("virtio-blk-mmio", -1, f"Index -1 is out of bounds {BLOCK_SLOTS} for block to add replaceable device"),
    ("virtio-net-mmio", NET_SLOTS, f"Index {NET_SLOTS} is out of bounds {NET_SLOTS} for net to add "
                                   "replaceable device"),
])
def test_attach_refusals_change_nothing(slots, image, driver, slot, text):
    slots.register("d", SlotKind.BLOCK, image("a.img"), SPEC[SlotKind.BLOCK])
    assert refusal(slots.attach, "d", driver, slot) == text
    assert all(dev.backend is None for dev in slots.blk + slots.net)
    slots.attach("d", "virtio-blk-mmio", 0)  # the registration is still there


def test_busy_slot_double_attach_and_duplicate_device_id(slots, image):
    slots.register("a", SlotKind.BLOCK, image("a.img"), SPEC[SlotKind.BLOCK])
    slots.register("b", SlotKind.BLOCK, image("b.img"), SPEC[SlotKind.BLOCK])
    slots.attach("a", "virtio-blk-mmio", 0)
    assert refusal(slots.attach, "b", "virtio-blk-mmio", 0) == (
        "The slot 0 is already used for adding replaceable device, a")
    assert refusal(slots.attach, "a", "virtio-blk-mmio", 3) == "a is already attached to slot 0."
    assert refusal(slots.attach, "a", "virtio-blk-mmio", 1, backend_id="b") == "Duplicate device ID 'a'"
    assert refusal(slots.attach, "x", "virtio-blk-mmio", 1) == (
        "Failed to find the configuration to add replaceable device, id: x driver: virtio-blk-mmio")


def test_registration_rules(slots, image):
    disk = image("a.img")
    slots.register("a", SlotKind.BLOCK, disk, SPEC[SlotKind.BLOCK])
    assert refusal(slots.register, "a", SlotKind.BLOCK, image("b.img"),
                   SPEC[SlotKind.BLOCK]) == "Add the id a repeatedly"
    again = FileBackend.open(DriveConfig("c", disk.path, direct=False))
    try:
        assert "a disk image (the root disk included) can be attached only once" in refusal(
            slots.register, "c", SlotKind.BLOCK, again, SPEC[SlotKind.BLOCK])
    finally:
        again.close()  # a refused backend stays the caller's
    for i in range(slots.max_registrations - 1):
        slots.register(f"t{i}", SlotKind.NET, FakeTap(), SPEC[SlotKind.NET])
    assert refusal(slots.register, "one-more", SlotKind.NET, FakeTap(), SPEC[SlotKind.NET]) == (
        f"The size {slots.max_registrations} of replaceable configs extend the max size "
        f"{slots.max_registrations}, id one-more.")


def test_unregister_closes_an_unattached_backend_only(slots):
    tap = FakeTap()
    slots.register("n", SlotKind.NET, tap, SPEC[SlotKind.NET])
    slots.attach("n", "virtio-net-mmio", 1)
    assert refusal(slots.unregister, "n") == "n is attached to slot 1; remove it with device_del first."
    with pytest.raises(MachineError) as info:
        slots.unregister("nothing")
    assert info.value.error_class is ErrorClass.DEVICE_NOT_FOUND
    spare = FakeTap()
    slots.register("spare", SlotKind.NET, spare, SPEC[SlotKind.NET])
    slots.unregister("spare")
    assert spare.closed and not tap.closed


def test_close_releases_what_no_device_took(slots):
    taken, left = FakeTap(), FakeTap()
    slots.register("taken", SlotKind.NET, taken, SPEC[SlotKind.NET])
    slots.register("left", SlotKind.NET, left, SPEC[SlotKind.NET])
    slots.attach("taken", "virtio-net-mmio", 0)
    slots.close()
    assert left.closed and not taken.closed  # the device owns (and closes) what it took


def test_state_says_which_spec_is_where(slots, image):
    from pystratovirt.machine.slots import OccupantState, RegistrationState, SlotsState
    drive = DriveConfig("drive-0", "/images/a.img", read_only=True)
    netdev = NetdevConfig("net-0", ifname="tap7")
    spare = NetdevConfig("spare", fds=("5",))
    slots.register("drive-0", SlotKind.BLOCK, image("a.img"), drive)
    slots.register("net-0", SlotKind.NET, FakeTap(), netdev)
    slots.register("spare", SlotKind.NET, FakeTap(), spare)
    slots.attach("virtio-0", "virtio-blk-mmio", 2, backend_id="drive-0", serial="SN").result()
    slots.attach("net-0", "virtio-net-mmio", 1).result()
    assert slots.save_state() == SlotsState(
        registrations=(RegistrationState("drive-0", SlotKind.BLOCK, drive),
                       RegistrationState("net-0", SlotKind.NET, netdev),
                       RegistrationState("spare", SlotKind.NET, spare)),
        occupants=(OccupantState(SlotKind.BLOCK, 2, "virtio-0", "drive-0", (("serial", "SN"),)),
                   OccupantState(SlotKind.NET, 1, "net-0", "net-0", ())))
    slots.detach("virtio-0").result()
    assert [o.device_id for o in slots.save_state().occupants] == ["net-0"]


def test_last_occupant_names_a_disk_after_its_unplug(slots, image):
    """BLOCK_IO_ERROR names the slot's disk even when its report reaches the control loop after
    device_del emptied the slot; a later disk in the slot takes over the name."""
    assert slots.last_occupant(SlotKind.BLOCK, 2) is None
    slots.register("drive-a", SlotKind.BLOCK, image("a.img"), SPEC[SlotKind.BLOCK])
    slots.attach("disk-a", "virtio-blk-mmio", 2, "drive-a")
    assert slots.last_occupant(SlotKind.BLOCK, 2) == ("disk-a", "drive-a")
    slots.detach("disk-a")
    assert slots.last_occupant(SlotKind.BLOCK, 2) == ("disk-a", "drive-a")
    slots.register("drive-b", SlotKind.BLOCK, image("b.img"), SPEC[SlotKind.BLOCK])
    slots.attach("disk-b", "virtio-blk-mmio", 2, "drive-b")
    assert slots.last_occupant(SlotKind.BLOCK, 2) == ("disk-b", "drive-b")
    assert slots.last_occupant(SlotKind.NET, 2) is None
