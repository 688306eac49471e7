"""Argument checking at the schema: strings that would reach the OS (NUL, lone surrogates,
lengths in UTF-8 bytes), descriptor references, and what StratoVirt 2.x clients send, byte for
byte. A bad value is a GenericError sentence naming the parameter, never a request."""

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystratovirt.machine.fds import parse_reference
from pystratovirt.machine.requests import BlockdevAdd, CloseFd, DeviceAdd, ErrorClass, GetFd, NetdevAdd, QmpCapabilities
from pystratovirt.qmp.schema import QmpError, command_names, decode, parse_command
from pystratovirt.virtio.block_backend import DriveConfig
from pystratovirt.virtio.tap import NetdevConfig

FDS = ("Parameter 'fds' expects a file descriptor number (0 to 2147483647) or a getfd name, "
       "or several joined by ':'")


def desc_of(execute: str, arguments) -> str:
    with pytest.raises(QmpError) as info:
        parse_command({"execute": execute, "arguments": arguments})
    assert info.value.error_class is ErrorClass.GENERIC_ERROR
    return info.value.desc


# -- issue 9, defect 3: each of these answered "Internal error" with a traceback in the log ------

@pytest.mark.parametrize("execute, arguments, desc", [
    ("blockdev-add", {"node-name": "d", "file": {"filename": "/tmp/a\u0000b"}},
     "Parameter 'file.filename' expects a string without NUL characters"),
    ("blockdev-add", {"node-name": "d", "file": {"filename": "/tmp/a\ud800"}},
     "Parameter 'file.filename' expects valid Unicode text (a lone surrogate has no UTF-8 "
     "encoding)"),
    ("netdev_add", {"id": "n", "ifname": "ta\u0000p"},
     "Parameter 'ifname' expects a string without NUL characters"),
    ("netdev_add", {"id": "n", "ifname": "t\ud800"},
     "Parameter 'ifname' expects valid Unicode text (a lone surrogate has no UTF-8 encoding)"),
    ("netdev_add", {"id": "n", "ifname": "x" * 16},
     "Parameter 'ifname' expects a string of at most 15 bytes"),
    ("netdev_add", {"id": "n", "ifname": "é" * 8},  # 8 characters, 16 bytes
     "Parameter 'ifname' expects a string of at most 15 bytes"),
    ("netdev_add", {"id": "n", "fds": "-1"}, FDS),
    ("netdev_add", {"id": "n", "fds": "18446744073709551616"}, FDS),
    ("netdev_add", {"id": "n", "fds": 2**40}, FDS),
    ("netdev_add", {"id": "n", "fds": 2**31}, FDS),
    ("netdev_add", {"id": "n", "ifname": "t", "vhostfds": "3:-4"},
     FDS.replace("'fds'", "'vhostfds'")),
])
def test_strings_that_crashed_the_machine_are_refused_here(execute, arguments, desc):
    assert desc_of(execute, arguments) == desc


def test_limits_are_inclusive():
    assert parse_command({"execute": "netdev_add", "arguments": {
        "id": "n", "ifname": "x" * 15, "fds": 2**31 - 1}}).request == \
        NetdevAdd(NetdevConfig("n", ifname="x" * 15, fds=(str(2**31 - 1),)))
    path = "/" + "p" * 4094
    assert parse_command({"execute": "blockdev-add", "arguments": {
        "node-name": "d", "file": {"filename": path}}}).request.drive.path == path
    assert desc_of("blockdev-add", {"node-name": "d", "file": {"filename": path + "p"}}) == \
        "Parameter 'file.filename' expects a string of at most 4095 bytes"


# Every string argument of every command, with arguments that are otherwise valid.
STRING_ARGUMENTS = [
    ("blockdev-add", {"node-name": "d", "file": {"filename": "/f"}}, ["node-name"]),
    ("blockdev-add", {"node-name": "d", "file": {"filename": "/f"}}, ["file", "filename"]),
    ("blockdev-del", {"node-name": "d"}, ["node-name"]),
    ("netdev_add", {"id": "n", "ifname": "tap0"}, ["id"]),
    ("netdev_add", {"id": "n", "ifname": "tap0"}, ["ifname"]),
    ("netdev_add", {"id": "n", "fds": "fd0"}, ["fds"]),
    ("netdev_add", {"id": "n", "fds": "fd0", "vhostfds": "v0"}, ["vhostfds"]),
    ("netdev_del", {"id": "n"}, ["id"]),
    ("device_add", {"id": "d", "driver": "virtio-blk-mmio"}, ["id"]),
    ("device_add", {"id": "d", "driver": "virtio-blk-mmio"}, ["driver"]),
    ("device_add", {"id": "d", "driver": "virtio-blk-mmio", "drive": "x"}, ["drive"]),
    ("device_add", {"id": "d", "driver": "virtio-net-mmio", "netdev": "x"}, ["netdev"]),
    ("device_add", {"id": "d", "driver": "virtio-blk-mmio", "bus": "x"}, ["bus"]),
    ("device_add", {"id": "d", "driver": "virtio-blk-mmio", "iothread": "x"}, ["iothread"]),
    ("device_del", {"id": "d"}, ["id"]),
    ("qom-get", {"path": "/p", "property": "x"}, ["path"]),
    ("qom-get", {"path": "/p", "property": "x"}, ["property"]),
    ("qom-set", {"path": "/p", "property": "x", "value": "s"}, ["value"]),
    ("getfd", {"fdname": "fd0"}, ["fdname"]),
    ("closefd", {"fdname": "fd0"}, ["fdname"]),
    ("qmp_capabilities", {"enable": []}, ["enable", 0]),
]


def with_value(arguments: dict, path: list, value) -> dict:
    """A copy of ``arguments`` with the member at ``path`` (keys and list indexes) replaced."""
    arguments = json.loads(json.dumps(arguments))
    target = arguments
    for key in path[:-1]:
        target = target[key]
    if isinstance(target, list):
        target.insert(path[-1], value)
    else:
        target[path[-1]] = value
    return arguments


@pytest.mark.parametrize("execute, arguments, path", STRING_ARGUMENTS,
                         ids=[f"{c}-{'.'.join(map(str, p))}" for c, _, p in STRING_ARGUMENTS])
@pytest.mark.parametrize("value", ["a\x00b", "a\ud800", "\udfff", "x" * 5000])
def test_every_string_argument_is_checked(execute, arguments, path, value):
    parse_command({"execute": execute, "arguments": arguments})  # valid as given
    hostile = with_value(arguments, path, value)
    desc = desc_of(execute, hostile)
    name = ".".join(str(p) for p in path if not isinstance(p, int))
    assert f"'{name}'" in desc, desc


# -- what StratoVirt 2.x clients send (../shared/reference/stratovirt-2x-clients.md) -------------

def parse_bytes(line: bytes):
    return parse_command(decode(line)).request


def test_kata_block_hotplug_byte_for_byte():
    # govmm marshals maps, so keys are sorted and "arguments" comes before "execute".
    add = parse_bytes(b'{"arguments":{"driver":"raw","file":{"aio":"native","driver":"file",'
                      b'"filename":"/run/kata/disk.img"},"node-name":"drive-abc","read-only":'
                      b'false},"execute":"blockdev-add"}')
    assert add == BlockdevAdd(DriveConfig("drive-abc", "/run/kata/disk.img", read_only=False))
    dev = parse_bytes(b'{"arguments":{"addr":"1","drive":"drive-abc","driver":"virtio-blk-mmio",'
                      b'"id":"drive-abc","romfile":""},"execute":"device_add"}')
    assert dev == DeviceAdd("drive-abc", "virtio-blk-mmio", addr=1, drive="drive-abc")
    assert dev.slot == 1
    host_device = parse_bytes(b'{"arguments":{"driver":"raw","file":{"driver":"host_device",'
                              b'"filename":"/dev/dm-3"},"node-name":"d","read-only":true},'
                              b'"execute":"blockdev-add"}')
    assert host_device.drive.read_only  # host_device opens as file does


def test_openeuler_kata_nic_and_block_hotplug():
    assert parse_bytes(b'{"arguments":{"fdname":"fd0"},"execute":"getfd"}') == GetFd("fd0")
    assert parse_bytes(b'{"arguments":{"fdname":"fd0"},"execute":"closefd"}') == CloseFd("fd0")
    assert parse_bytes(b'{"arguments":{"fds":"fd0:fd1","id":"tap1","type":"tap","vhost":true,'
                       b'"vhostfds":"vhostfd0"},"execute":"netdev_add"}') == \
        NetdevAdd(NetdevConfig("tap1", fds=("fd0:fd1",), vhost=True, vhostfds=("vhostfd0",)))
    assert parse_bytes(b'{"arguments":{"downscript":"no","id":"tap1","ifname":"tap_kata",'
                       b'"script":"no","type":"tap"},"execute":"netdev_add"}') == \
        NetdevAdd(NetdevConfig("tap1", ifname="tap_kata"))
    assert parse_bytes(b'{"arguments":{"addr":"2","driver":"virtio-net-pci","id":"tap1",'
                       b'"mac":"02:42:ac:11:00:02","netdev":"tap1","romfile":""},'
                       b'"execute":"device_add"}') == \
        DeviceAdd("tap1", "virtio-net-pci", addr=2, netdev="tap1", mac="02:42:ac:11:00:02")
    assert parse_bytes(b'{"arguments":{"addr":"1","drive":"d","driver":"virtio-blk-pci",'
                       b'"id":"d","romfile":"","share-rw":"on"},"execute":"device_add"}') == \
        DeviceAdd("d", "virtio-blk-pci", addr=1, drive="d")


def test_kuasar_negotiation_and_pci_block_hotplug():
    assert parse_bytes(b'{"execute":"qmp_capabilities","arguments":{"enable":[]}}\n') == \
        QmpCapabilities()
    add = parse_bytes(b'{"execute":"blockdev-add","arguments":{"driver":"raw","read-only":false,'
                      b'"node-name":"drive-0","cache":{"direct":true},"file":{"driver":"file",'
                      b'"filename":"/dev/dm-8"}}}\n')
    assert add == BlockdevAdd(DriveConfig("drive-0", "/dev/dm-8", direct=True))
    dev = parse_bytes(b'{"execute":"device_add","arguments":{"driver":"virtio-blk-pci",'
                      b'"id":"virtio-drive-0","bus":"pcie.1","addr":"0x0","drive":"drive-0"}}\n')
    assert dev == DeviceAdd("virtio-drive-0", "virtio-blk-pci", addr=0, drive="drive-0")
    assert parse_bytes(b'{"execute":"query-status","arguments":{}}\n')


@pytest.mark.parametrize("value", [True, False, "on", "off"])
def test_share_rw_as_govmm_and_qemu_spell_it(value):
    parse_command({"execute": "device_add", "arguments": {
        "id": "d", "driver": "virtio-blk-mmio", "share-rw": value}})


@pytest.mark.parametrize("execute, arguments, desc", [
    ("netdev_add", {"id": "n", "ifname": "t", "script": "/etc/qemu-ifup"},
     "Parameter 'script' expects 'no' (this VMM never runs host scripts)"),
    ("netdev_add", {"id": "n", "ifname": "t", "downscript": ""},
     "Parameter 'downscript' expects 'no' (this VMM never runs host scripts)"),
    ("netdev_add", {"id": "n", "ifname": "t", "script": None},
     "Parameter 'script' expects 'no' (this VMM never runs host scripts)"),
    ("netdev_add", {"id": "n", "ifname": "t", "queues": 2},
     "Parameter 'queues' expects 1 (multi-queue taps are not supported)"),
    ("netdev_add", {"id": "n", "ifname": "a/b"},
     "Parameter 'ifname' expects an interface name without '/', ':' or spaces"),
    ("netdev_add", {"id": "n", "ifname": ".."},
     "Parameter 'ifname' expects an interface name without '/', ':' or spaces"),
    ("netdev_add", {"id": "n", "fds": "fd0:"}, FDS),
    ("netdev_add", {"id": "n", "fds": ""}, FDS),
    ("netdev_add", {"id": "n", "fds": "fd 0"}, FDS),
    ("device_add", {"id": "d", "driver": "virtio-blk-mmio", "romfile": "/usr/share/ipxe.rom"},
     "Parameter 'romfile' expects '' (option ROMs are not supported)"),
    ("device_add", {"id": "d", "driver": "virtio-blk-mmio", "share-rw": "yes"},
     "Parameter 'share-rw' expects a boolean (or 'on' or 'off')"),
    ("device_add", {"id": "d", "driver": "virtio-net-mmio", "mq": "on"},
     "Parameter 'mq' expects false (multi-queue devices are not supported)"),
    ("device_add", {"id": "d", "driver": "virtio-net-mmio", "disable-modern": True},
     "Parameter 'disable-modern' expects false (only modern virtio devices exist here)"),
    ("device_add", {"id": "d", "driver": "virtio-net-mmio", "mac": "52:54:00:12:34"},
     "Parameter 'mac' expects a MAC address such as '52:54:00:12:34:56'"),
    ("device_add", {"id": "d", "driver": "virtio-net-mmio", "drive": ""},
     "Parameter 'drive' expects a non-empty string"),
    ("blockdev-add", {"node-name": "d", "file": {"filename": "/f", "aio": "io_uring"}},
     "Parameter 'file.aio' expects 'native' or 'threads'"),
    ("blockdev-add", {"node-name": "d", "file": {"filename": "/f", "aio": 1}},
     "Parameter 'file.aio' expects 'native' or 'threads'"),
    ("getfd", {"fdname": "fd:0"},
     "Parameter 'fdname' expects a name of letters, digits, '_', '.' and '-' (at most 128)"),
    ("getfd", {"fdname": 7}, "Parameter 'fdname' expects a string"),
    ("getfd", {"fdname": "fd0", "fd": 3}, "Invalid parameter 'fd'"),
])
def test_what_the_micro_vm_cannot_honour_is_refused(execute, arguments, desc):
    assert desc_of(execute, arguments) == desc


# -- any value of any JSON type, for every argument of every command -----------------------------

KNOWN_KEYS = ["id", "value", "addr", "lun", "node-name", "file", "cache", "read-only", "ifname",
              "fds", "vhost", "vhostfds", "driver", "filename", "enable", "fdname", "path",
              "property", "drive", "netdev", "mac", "romfile", "share-rw", "bus", "type",
              "script", "downscript", "queues", "direct", "no-flush", "aio", "locking",
              "iothread", "mq", "vectors", "disable-modern"]
hostile_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "0x1", "1", "18446744073709551616", "fd0", "fd0:3", "3:4",
                     "a\x00b", "\ud800", "x\udfff", "on", "off", "no", "raw", "file", "native",
                     "host_device", "virtio-blk-mmio", "virtio-net-pci", "/dev/null", "..",
                     "52:54:00:12:34:56", "é" * 9, "x" * 300]),
    st.integers(0, 5000).map(lambda n: "p" * n))
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([2**31, 2**40])
           | st.floats(allow_nan=False, allow_infinity=False) | hostile_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=5),
                                             inner, max_size=4), max_leaves=8)
arguments = st.dictionaries(st.sampled_from(KNOWN_KEYS), json_values, max_size=5)


def strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_in(item)
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from strings_in(getattr(value, field.name))


@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.sampled_from(command_names()), arguments)
def test_any_json_value_is_a_request_or_a_sentence(execute, args):
    try:
        request = parse_command({"execute": execute, "arguments": args}).request
    except QmpError as err:
        assert err.error_class is ErrorClass.GENERIC_ERROR
        assert isinstance(err.desc, str) and err.desc
        return
    # What reaches the machine can reach the OS: every string is NUL-free, encodable UTF-8.
    for text in strings_in(request):
        assert "\x00" not in text
        text.encode("utf-8")
    for key in ("fds", "vhostfds"):
        reference = getattr(request, key, None)
        if reference is not None:
            for field in reference.split(":"):
                parse_reference(field)
