"""The snapshot's state file and its checks, without KVM: the typed value encoding round-trips a
whole MachineState; a missing, truncated, corrupted, newer or malformed state file, a missing or
short memory file, and a command line that does not match the snapshot each give one
SnapshotError sentence (fuzzed: any byte changed or cut gives that sentence, never a traceback)."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystratovirt.devices.acpi_pm import AcpiPmState
from pystratovirt.devices.serial import SerialState
from pystratovirt.machine import snapshot
from pystratovirt.machine.slots import OccupantState, RegistrationState, SlotKind, SlotsState
from pystratovirt.machine.snapshot import CODEC, MachineState, WindowState, check_config, load
from pystratovirt.machine.snapshot_format import FORMAT_VERSION, MAGIC, Codec, SnapshotError, pack_state, unpack_state
from pystratovirt.machine.vmconfig import (
    BalloonConfig,
    BlockDeviceConfig,
    BootSource,
    MachineConfig,
    NetDeviceConfig,
    VmConfig,
)
from pystratovirt.memory.layout import MiB
from pystratovirt.virtio.balloon import BalloonState, BalloonStats
from pystratovirt.virtio.blk import BlkState
from pystratovirt.virtio.block_backend import DriveConfig
from pystratovirt.virtio.device import VirtioState
from pystratovirt.virtio.mmio import MmioState, QueueRegsState
from pystratovirt.virtio.net import NetState
from pystratovirt.virtio.queue import QueueState
from pystratovirt.virtio.tap import NetdevConfig

MAC = bytes.fromhex("525400123456")


def config(**changes) -> VmConfig:
    base = dict(
        boot=BootSource("/k", "console=ttyS0"), name="vm",
        machine=MachineConfig(vcpus=2, mem_size=256 * MiB),
        drives=[DriveConfig("rootfs", "/images/root.img", read_only=True)],
        netdevs=[NetdevConfig("net0", ifname="tap0")],
        block_devices=[BlockDeviceConfig("rootfs", "rootfs", serial="SN1")],
        net_devices=[NetDeviceConfig("net0", "net0", mac="52:54:00:12:34:56")],
        balloon=BalloonConfig(deflate_on_oom=True))
    return VmConfig(**(base | changes))


def transport(queues: int, status: int = 0xF) -> MmioState:
    return MmioState(status, 1, 1, (1 << 32) | (1 << 29), 0,
                     tuple(QueueRegsState(256, True, 0x10000 * (i + 1), 0x10000 * (i + 1) + 0x1000,
                                          0x10000 * (i + 1) + 0x2000) for i in range(queues)), 1)


def virtio(queues: int) -> VirtioState:
    return VirtioState(b"\x01\x02" * 30, 3, False, (1 << 32) | (1 << 29),
                       tuple(QueueState(256, 0x10000 * (i + 1), 0x10000 * (i + 1) + 0x1000,
                                        0x10000 * (i + 1) + 0x2000, True, False, 7, 5, None if i else 5)
                             for i in range(queues)))


def sample() -> MachineState:
    cfg = config()
    return MachineState(
        vmm_version="0.1.0", created=1764096000.25, config=cfg, memory_size=cfg.machine.mem_size,
        vcpus=(b"vcpu0" * 100, b"vcpu1" * 100), vm=b"\0" * 300,
        serial=SerialState(1, 3, 8, 0, 12, 0, 0xC1, True, b"ls\n"),
        acpi_pm=AcpiPmState(False),
        windows=(WindowState(0, transport(1), BlkState(virtio(1), "SN1", True)),
                 WindowState(1, transport(1, 0), BlkState(VirtioState(bytes(60), 0, False, None, ()), None, False)),
                 WindowState(6, transport(2), NetState(virtio(2), MAC, True)),
                 WindowState(8, transport(3), BalloonState(virtio(3), ((0, b"\xff" * 4), (4096, b"\x01")), 2,
                                                           BalloonStats({"free-memory": 1 << 27}, 17.5)))),
        slots=SlotsState(
            (RegistrationState("rootfs", SlotKind.BLOCK, cfg.drives[0]),
             RegistrationState("net0", SlotKind.NET, cfg.netdevs[0]),
             RegistrationState("hot", SlotKind.BLOCK, DriveConfig("hot", "/images/hot.img"))),
            (OccupantState(SlotKind.BLOCK, 0, "rootfs", "rootfs", (("serial", "SN1"),)),
             OccupantState(SlotKind.BLOCK, 1, "hot-dev", "hot", (("serial", None),)),
             OccupantState(SlotKind.NET, 0, "net0", "net0", ()))))


# -- the encoding ---------------------------------------------------------------------------------------
def test_a_whole_machine_state_round_trips():
    state = sample()
    data = pack_state(CODEC, state)
    assert data[:8] == MAGIC and struct.unpack_from("<I", data, 8)[0] == FORMAT_VERSION
    back = unpack_state(CODEC, data)
    assert back == state
    assert isinstance(back.config.drives, list) and isinstance(back.windows, tuple)
    assert back.config.machine.max_vcpus == 2


def test_the_codec_knows_every_record_type_from_the_annotations():
    names = {t.__name__ for t in CODEC.record_types}
    assert {"MachineState", "VmConfig", "DriveConfig", "NetdevConfig", "BlkState", "NetState", "BalloonState",
            "BalloonStats", "RngState", "ConsoleState", "QueueState", "MmioState", "SlotsState",
            "OccupantState"} <= names


def repack(payload: bytes, version: int = FORMAT_VERSION, flags: int = 0) -> bytes:
    head = struct.pack("<8sIIQ", MAGIC, version, flags, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def payload_of(data: bytes) -> bytes:
    return data[24:-32]


@pytest.mark.parametrize("edit, message", [
    (lambda d: b"NOTASNAP" + d[8:], "is not a pystratovirt snapshot"),
    (lambda d: b"", "is truncated: it has 0 bytes"),
    (lambda d: d[:20], "is truncated: it has 20 bytes"),
    (lambda d: d[:-1], "is truncated: it has"),
    (lambda d: d + b"x", "1 bytes of unexpected data after its end"),
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "is corrupted: its checksum does not match"),
    (lambda d: repack(payload_of(d), version=FORMAT_VERSION + 1), "format version 3, newer than"),
    (lambda d: repack(payload_of(d), version=1), "format version 1, older than this pystratovirt reads (2)"),
    (lambda d: repack(payload_of(d), version=0), "format version 0, which never existed"),
    (lambda d: repack(payload_of(d), flags=4), "uses flags 0x4"),
    (lambda d: repack(payload_of(d) + b"N"), "is malformed: 1 bytes follow the value"),
    (lambda d: repack(payload_of(d).replace(b"memory_size", b"memory_sizz")), "lacks field 'memory_size'"),
    (lambda d: repack(payload_of(d).replace(b"s\x0bAcpiPmState", b"s\x0bNotAPmState")),
     "is a NotAPmState record, not AcpiPmState"),
])
def test_each_kind_of_damage_has_its_sentence(edit, message):
    with pytest.raises(SnapshotError) as info:
        unpack_state(CODEC, edit(pack_state(CODEC, sample())))
    assert message in info.value.desc
    assert "\n" not in info.value.desc and info.value.desc.endswith(".")


def test_field_types_are_checked_even_behind_a_good_checksum():
    good = dataclasses.replace(sample(), memory_size="256M")
    out = bytearray()
    from pystratovirt.machine.snapshot_format import _encode
    _encode(good, out)
    with pytest.raises(SnapshotError, match=r"MachineState.memory_size is not an integer"):
        unpack_state(CODEC, repack(bytes(out)))
    bad_queue = dataclasses.replace(sample(), windows=(WindowState(0, transport(1), NetState(virtio(1), 7, True)),))
    out = bytearray()
    _encode(bad_queue, out)
    with pytest.raises(SnapshotError, match=r"MachineState.windows\[0\].device.mac is not a byte string"):
        unpack_state(CODEC, repack(bytes(out)))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PACKED = pack_state(CODEC, sample())


@FUZZ
@given(st.integers(0, len(PACKED) - 1), st.integers(1, 255))
def test_any_changed_byte_gives_one_sentence(position, xor):
    data = bytearray(PACKED)
    data[position] ^= xor
    with pytest.raises(SnapshotError) as info:
        unpack_state(CODEC, bytes(data))
    assert "\n" not in info.value.desc


@FUZZ
@given(st.integers(0, len(PACKED) - 1))
def test_any_truncation_gives_one_sentence(length):
    with pytest.raises(SnapshotError, match="truncated|not a pystratovirt snapshot"):
        unpack_state(CODEC, PACKED[:length])


@FUZZ
@given(st.binary(max_size=600))
def test_any_payload_behind_a_good_checksum_decodes_or_gives_one_sentence(payload):
    try:
        value = unpack_state(CODEC, repack(payload))
    except SnapshotError as exc:
        assert "\n" not in exc.desc
    else:
        assert isinstance(value, MachineState)


@FUZZ
@given(st.integers(0, len(payload_of(PACKED)) - 1), st.binary(min_size=1, max_size=4))
def test_any_payload_edit_behind_a_good_checksum_gives_one_sentence_or_a_whole_value(position, patch):
    payload = bytearray(payload_of(PACKED))
    payload[position:position + len(patch)] = patch
    try:
        value = unpack_state(CODEC, repack(bytes(payload)))
    except SnapshotError as exc:
        assert "\n" not in exc.desc
    else:
        assert isinstance(value, MachineState)


def test_a_codec_refuses_types_it_was_not_built_for():
    @dataclasses.dataclass(frozen=True)
    class Other:
        x: int
    with pytest.raises(TypeError):
        CODEC.encode(Other(1))
    with pytest.raises(SnapshotError, match="is a Other record, not MachineState"):
        CODEC.decode(Codec(Other).encode(Other(1)))


# -- the snapshot directory --------------------------------------------------------------------------
def write_snapshot(directory, state: MachineState, memory_size: int | None = None) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "state").write_bytes(pack_state(CODEC, state))
    with open(directory / "memory", "wb") as f:
        f.truncate(state.memory_size if memory_size is None else memory_size)


def test_load_checks_the_directory_and_both_files(tmp_path):
    with pytest.raises(SnapshotError, match="does not exist or is not a directory"):
        load(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match="There is no snapshot state file at"):
        load(str(tmp_path / "empty"))
    state = sample()
    write_snapshot(tmp_path / "s", state)
    assert load(str(tmp_path / "s")) == state
    (tmp_path / "s" / "memory").unlink()
    with pytest.raises(SnapshotError, match="has no memory file"):
        load(str(tmp_path / "s"))
    write_snapshot(tmp_path / "s", state, memory_size=state.memory_size - 4096)
    with pytest.raises(SnapshotError, match=f"memory file is {state.memory_size - 4096} bytes, but its state says"):
        load(str(tmp_path / "s"))
    bad = dataclasses.replace(state, memory_size=128 * MiB)
    write_snapshot(tmp_path / "t", bad)
    with pytest.raises(SnapshotError, match="contradicts its configuration"):
        load(str(tmp_path / "t"))


# -- the new command line against the snapshot -----------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(machine=MachineConfig(vcpus=2, mem_size=512 * MiB)),
     "taken with 256 MiB of memory, but the command line gives 512 MiB"),
    (dict(machine=MachineConfig(vcpus=1, mem_size=256 * MiB)),
     "taken with 2 vCPU(s), but the command line gives 1 vCPU(s)"),
    (dict(machine=MachineConfig(vcpus=2, max_vcpus=4, mem_size=256 * MiB)),
     "but the command line gives 2 vCPU(s) (maxcpus 4)"),
    (dict(balloon=None), "has a balloon device, but the command line has none"),
    (dict(balloon=BalloonConfig(deflate_on_oom=False)), "deflate-on-oom=on, but the command line says off"),
    (dict(block_devices=[BlockDeviceConfig("rootfs", "rootfs", serial="SN1"), BlockDeviceConfig("x", "x")],
          drives=[DriveConfig("rootfs", "/r", read_only=True), DriveConfig("x", "/x")]),
     "puts disk 'x' in block slot 1, where the snapshot has 'hot-dev'"),
    (dict(block_devices=[BlockDeviceConfig("other", "rootfs", serial="SN1")]),
     "puts disk 'other' in block slot 0, where the snapshot has 'rootfs'"),
    (dict(block_devices=[BlockDeviceConfig("rootfs", "rootfs", serial="SN2")]),
     "has serial 'SN2' on the command line, but 'SN1' in the snapshot"),
    (dict(drives=[DriveConfig("rootfs", "/images/root.img")]),
     "Drive 'rootfs' is read-write on the command line, but read-only in the snapshot"),
    (dict(net_devices=[NetDeviceConfig("net0", "net0", mac="52:54:00:00:00:01")]),
     "MAC 52:54:00:00:00:01 on the command line, but 52:54:00:12:34:56 in the snapshot"),
    (dict(net_devices=[NetDeviceConfig("net0", "net0"), NetDeviceConfig("net1", "net1")],
          netdevs=[NetdevConfig("net0", ifname="tap0"), NetdevConfig("net1", ifname="tap1")]),
     "puts NIC 'net1' in net slot 1, which is empty in the snapshot"),
])
def test_a_command_line_that_does_not_match_is_named(changes, message):
    with pytest.raises(SnapshotError) as info:
        check_config(sample(), config(**changes))
    assert message in info.value.desc


def test_a_matching_command_line_may_move_backends_and_leave_out_hot_plugged_disks():
    check_config(sample(), config())
    # Another disk file and another tap for the same devices (a clone), MAC left to the snapshot.
    check_config(sample(), config(drives=[DriveConfig("rootfs", "/clones/1.img", read_only=True)],
                                  netdevs=[NetdevConfig("net0", fds=("3",))],
                                  net_devices=[NetDeviceConfig("net0", "net0")]))


def test_query_migrate_ram_counts_pages():
    saved = snapshot.SavedSnapshot("/d", memory_written=3 * 4096, memory_size=256 * MiB, seconds=0.5)
    ram = snapshot.migration_ram(saved)
    assert (ram.normal, ram.duplicate, ram.total, ram.transferred) == (3, 65536 - 3, 256 * MiB, 12288)


def test_a_hot_plugged_tap_descriptor_is_not_reused_by_number():
    from pystratovirt.machine.snapshot import _restore_slots

    class Machine:
        def execute(self, request):
            raise AssertionError(f"nothing may be opened: {request}")
    slots = SlotsState((RegistrationState("hot", SlotKind.NET, NetdevConfig("hot", fds=("5",))),), ())
    with pytest.raises(SnapshotError, match="'hot' was a file descriptor the old process was given"):
        _restore_slots(Machine(), slots, config(netdevs=[], net_devices=[]))
