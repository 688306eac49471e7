"""The QMP schema: every command's arguments (good and bad), and the exact bytes of every reply and
event in the seed's key order."""

import json

import pytest

from pystratovirt.machine.requests import (
    Balloon,
    BalloonChangedEvent,
    BalloonGuestStats,
    BalloonInfo,
    BlockdevAdd,
    BlockdevDel,
    BlockErrorAction,
    BlockIoErrorEvent,
    CommandInfo,
    Cont,
    CpuInfo,
    CpuProps,
    DeviceAdd,
    DeviceDel,
    DeviceDeletedEvent,
    ErrorClass,
    HotpluggableCpu,
    IoOperation,
    NetdevAdd,
    NetdevDel,
    QmpCapabilities,
    QomGet,
    QomSet,
    QueryBalloon,
    QueryCommands,
    QueryCpus,
    QueryHotpluggableCpus,
    QueryStatus,
    QueryVersion,
    Quit,
    ResumeEvent,
    RunState,
    ShutdownEvent,
    ShutdownReason,
    StatusInfo,
    Stop,
    StopEvent,
)
from pystratovirt.qmp.schema import (
    GREETING,
    VERSION,
    Command,
    QmpError,
    command_names,
    decode,
    encode_error,
    encode_event,
    encode_return,
    parse_command,
)
from pystratovirt.virtio.block_backend import DriveConfig
from pystratovirt.virtio.tap import NetdevConfig


def parse(obj):
    return parse_command(obj).request


def parse_text(text):
    return parse_command(decode(text.encode()))


def rejected(obj) -> QmpError:
    with pytest.raises(QmpError) as info:
        parse_command(obj)
    return info.value


def bad_args(execute, arguments) -> str:
    err = rejected({"execute": execute, "arguments": arguments})
    assert err.error_class is ErrorClass.GENERIC_ERROR
    return err.desc


# -- framing of a command -----------------------------------------------------------------------

def test_greeting_bytes():
    assert GREETING == (b'{"QMP":{"version":{"qemu":{"micro":1,"minor":0,"major":4},'
                        b'"package":""},"capabilities":[]}}\n')


@pytest.mark.parametrize("cmd_id", [7, 0, "abc", "__qmp#00001", 2.5, 10**30])
def test_id_is_kept_and_echoed_after_return_or_error(cmd_id):
    command = parse_command({"execute": "query-status", "id": cmd_id})
    assert command == Command("query-status", QueryStatus(), cmd_id)
    assert encode_return(None, cmd_id) == b'{"return":{},"id":%s}\n' % json.dumps(cmd_id).encode()
    assert encode_error(ErrorClass.GENERIC_ERROR, "x", cmd_id) == \
        b'{"error":{"class":"GenericError","desc":"x"},"id":%s}\n' % json.dumps(cmd_id).encode()


def test_id_echoed_on_command_errors():
    err = rejected({"execute": "nope", "id": 5})
    assert (err.error_class, err.desc, err.id) == (ErrorClass.COMMAND_NOT_FOUND,
                                                   "The command nope has not been found", 5)
    err = rejected({"execute": "balloon", "arguments": {}, "id": "x"})
    assert (err.desc, err.id) == ("Parameter 'value' is missing", "x")
    assert rejected({"id": 9}).id == 9


@pytest.mark.parametrize("cmd_id", [None, True, [1], {"a": 1}])
def test_id_must_be_number_or_string(cmd_id):
    err = rejected({"execute": "query-status", "id": cmd_id})
    assert err.desc == "QMP input member 'id' must be a number or a string"
    assert err.id is None


@pytest.mark.parametrize("obj, desc", [
    ([], "QMP input must be a JSON object"),
    (42, "QMP input must be a JSON object"),
    ("query-status", "QMP input must be a JSON object"),
    ({}, "QMP input lacks member 'execute'"),
    ({"execute": 1}, "QMP input member 'execute' must be a string"),
    ({"execute": "stop", "argument": {}}, "QMP input member 'argument' is unexpected"),
    ({"execute": "stop", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": "stop", "arguments": None}, "QMP input member 'arguments' must be an object"),
    ({"exec-oob": "stop"}, "Out-of-band execution is not supported"),
])
def test_malformed_commands(obj, desc):
    err = rejected(obj)
    assert (err.error_class, err.desc) == (ErrorClass.GENERIC_ERROR, desc)


def test_unknown_command_uses_qemu_wording():
    err = rejected({"execute": "foo"})
    assert err.error_class is ErrorClass.COMMAND_NOT_FOUND
    assert encode_error(err.error_class, err.desc) == \
        b'{"error":{"class":"CommandNotFound","desc":"The command foo has not been found"}}\n'


@pytest.mark.parametrize("text", ['{"execute": "stop"', "{'execute': 'stop'}", "NaN", "Infinity",
                                  '{"execute": "stop", "id": 1e999}', "\xff", "[" * 100000,
                                  '{"execute":"stop","execute":"quit"}'])
def test_decode_errors(text):
    with pytest.raises(QmpError) as info:
        decode(text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff")
    assert info.value.desc.startswith("Invalid JSON: ")


def test_duplicate_key_is_named():
    with pytest.raises(QmpError, match="duplicate key 'execute'"):
        decode(b'{"execute":"stop","execute":"quit"}')


def test_decode_accepts_utf8_and_whitespace():
    assert decode(' {"execute" : "device_del", "arguments": {"id": "dïsk"}}\n'.encode()) == \
        {"execute": "device_del", "arguments": {"id": "dïsk"}}


# -- commands without arguments -----------------------------------------------------------------

NO_ARGS = {
    "query-status": QueryStatus(), "query-cpus": QueryCpus(),
    "query-hotpluggable-cpus": QueryHotpluggableCpus(), "stop": Stop(), "cont": Cont(),
    "quit": Quit(), "query-balloon": QueryBalloon(), "query-version": QueryVersion(),
    "query-commands": QueryCommands(),
}


@pytest.mark.parametrize("name, request_", NO_ARGS.items())
def test_commands_without_arguments(name, request_):
    assert parse({"execute": name}) == request_
    assert parse({"execute": name, "arguments": {}}) == request_
    assert bad_args(name, {"foo": 1}) == "Invalid parameter 'foo'"


def test_qmp_capabilities():
    assert parse({"execute": "qmp_capabilities"}) == QmpCapabilities()
    assert parse({"execute": "qmp_capabilities", "arguments": {"enable": []}}) == QmpCapabilities()
    assert bad_args("qmp_capabilities", {"enable": ["oob"]}) == "Capability 'oob' not available"
    assert bad_args("qmp_capabilities", {"enable": "oob"}) == \
        "Parameter 'enable' expects a list of strings"


def test_command_names_cover_the_seed_and_the_conveniences():
    names = command_names()
    for name in ["qmp_capabilities", "query-status", "query-cpus", "query-hotpluggable-cpus",
                 "stop", "cont", "quit", "blockdev-add", "blockdev-del", "netdev_add",
                 "netdev_del", "device_add", "device_del", "balloon", "query-balloon",
                 "query-version", "query-commands"]:
        assert name in names
    assert len(set(names)) == len(names)


# -- blockdev-add / blockdev-del ----------------------------------------------------------------

def test_blockdev_add_seed_transcript():
    command = parse_text('{"execute": "blockdev-add", "arguments": {"node-name": "drive-0", '
                         '"file": {"driver": "file", "filename": "/path/to/block"}, "cache": '
                         '{"direct": true}, "read-only": false}}')
    assert command.request == BlockdevAdd(DriveConfig(id="drive-0", path="/path/to/block",
                                                      direct=True, no_flush=False, read_only=False))


def test_blockdev_add_defaults_and_options():
    assert parse({"execute": "blockdev-add", "arguments": {
        "node-name": "d", "file": {"filename": "/f"}}}) == BlockdevAdd(DriveConfig("d", "/f"))
    assert parse({"execute": "blockdev-add", "arguments": {
        "node-name": "d", "driver": "raw", "discard": "unmap", "id": "x",
        "file": {"driver": "host_device", "filename": "/dev/sdb"},
        "cache": {"direct": False, "no-flush": True}, "read-only": True}}) == \
        BlockdevAdd(DriveConfig("d", "/dev/sdb", direct=False, no_flush=True, read_only=True))


@pytest.mark.parametrize("arguments, desc", [
    ({"file": {"filename": "/f"}}, "Parameter 'node-name' is missing"),
    ({"node-name": "d"}, "Parameter 'file' is missing"),
    ({"node-name": "d", "file": "/f"}, "Parameter 'file' expects an object"),
    ({"node-name": "d", "file": {}}, "Parameter 'file.filename' is missing"),
    ({"node-name": "d", "file": {"filename": 3}}, "Parameter 'file.filename' expects a string"),
    ({"node-name": "d", "file": {"filename": "/f", "driver": "nbd"}},
     "Parameter 'file.driver' expects 'file' or 'host_device'"),
    ({"node-name": "d", "file": {"filename": "/f", "size": 1}}, "Invalid parameter 'file.size'"),
    ({"node-name": "d", "file": {"filename": "/f"}, "driver": "qcow2"},
     "Parameter 'driver' expects 'raw'"),
    ({"node-name": "d", "file": {"filename": "/f"}, "cache": {"direct": "yes"}},
     "Parameter 'cache.direct' expects a boolean"),
    ({"node-name": "d", "file": {"filename": "/f"}, "cache": {"writeback": True}},
     "Invalid parameter 'cache.writeback'"),
    ({"node-name": "d", "file": {"filename": "/f"}, "read-only": 0},
     "Parameter 'read-only' expects a boolean"),
    ({"node-name": "", "file": {"filename": "/f"}},
     "Parameter 'node-name' expects a non-empty string"),
    ({"nodename": "d", "file": {"filename": "/f"}}, "Invalid parameter 'nodename'"),
])
def test_blockdev_add_rejects(arguments, desc):
    assert bad_args("blockdev-add", arguments) == desc


def test_blockdev_del():
    assert parse({"execute": "blockdev-del", "arguments": {"node-name": "d"}}) == BlockdevDel("d")
    assert bad_args("blockdev-del", {}) == "Parameter 'node-name' is missing"
    assert bad_args("blockdev-del", {"node-name": 1}) == "Parameter 'node-name' expects a string"


# -- netdev_add / netdev_del --------------------------------------------------------------------

def test_netdev_add_seed_transcript():
    command = parse_text('{"execute":"netdev_add", "arguments":{"id":"net-0", "ifname":"tap0"}}')
    assert command.request == NetdevAdd(NetdevConfig(id="net-0", ifname="tap0"))


def test_netdev_add_options():
    assert parse({"execute": "netdev_add", "arguments": {"id": "n", "fds": 5}}) == \
        NetdevAdd(NetdevConfig("n", fds=("5",)))
    assert parse({"execute": "netdev_add", "arguments": {
        "id": "n", "type": "tap", "fds": "fd1", "vhost": "on", "vhostfds": "7",
        "script": "no", "downscript": "no", "queues": 1}}) == \
        NetdevAdd(NetdevConfig("n", fds=("fd1",), vhost=True, vhostfds=("7",)))
    assert parse({"execute": "netdev_add", "arguments": {
        "id": "n", "ifname": "tap1", "vhost": False}}) == NetdevAdd(NetdevConfig("n", ifname="tap1"))


FDS_EXPECTED = ("Parameter 'fds' expects a file descriptor number (0 to 2147483647) or a getfd name, "
                "or several joined by ':'")


@pytest.mark.parametrize("arguments, desc", [
    ({"ifname": "tap0"}, "Parameter 'id' is missing"),
    ({"id": "n"}, "Parameter 'ifname' or 'fds' is missing"),
    ({"id": "n", "ifname": 0}, "Parameter 'ifname' expects a string"),
    ({"id": "n", "fds": -1}, FDS_EXPECTED),
    ({"id": "n", "fds": [3]}, FDS_EXPECTED),
    ({"id": "n", "ifname": "t", "vhost": "maybe"},
     "Parameter 'vhost' expects a boolean (or 'on' or 'off')"),
    ({"id": "n", "ifname": "t", "type": "user"}, "Parameter 'type' expects 'tap'"),
    ({"id": "n", "ifname": "t", "mac": "52:54:00:00:00:01"}, "Invalid parameter 'mac'"),
])
def test_netdev_add_rejects(arguments, desc):
    assert bad_args("netdev_add", arguments) == desc


def test_netdev_del():
    assert parse({"execute": "netdev_del", "arguments": {"id": "n"}}) == NetdevDel("n")
    assert bad_args("netdev_del", {}) == "Parameter 'id' is missing"


# -- device_add / device_del --------------------------------------------------------------------

def test_device_add_seed_transcripts():
    blk = parse_text('{"execute": "device_add", "arguments": {"id": "drive-0", '
                     '"driver": "virtio-blk-mmio", "addr": "0x1"}}').request
    assert blk == DeviceAdd(id="drive-0", driver="virtio-blk-mmio", addr=1)
    assert blk.slot == 1
    net = parse_text('{"execute":"device_add", "arguments":{"id":"net-0", '
                     '"driver":"virtio-net-mmio", "addr":"0x0"}}').request
    assert net == DeviceAdd(id="net-0", driver="virtio-net-mmio", addr=0)


@pytest.mark.parametrize("extra, addr, lun, slot", [
    ({}, None, None, 0),
    ({"addr": "0x3"}, 3, None, 3),
    ({"addr": "0XaB"}, 0xAB, None, 0xAB),
    ({"addr": 2}, 2, None, 2),
    ({"lun": 0}, None, 0, 1),  # lun 0 is vdb
    ({"lun": 2, "addr": "0x1"}, 1, 2, 1),  # addr wins, as in StratoVirt
    ({"addr": "0x1", "bus": "pci.0", "drive": "d", "mac": "52:54:00:00:00:01",
      "share-rw": "on"}, 1, None, 1),
    ({"addr": "1"}, 1, None, 1),  # decimal, as StratoVirt >= 2.0 and Kata's govmm spell it
    ({"addr": "10"}, 10, None, 10),
    ({"addr": "0x10"}, 16, None, 16),
])
def test_device_add_slot(extra, addr, lun, slot):
    request = parse({"execute": "device_add",
                     "arguments": {"id": "d", "driver": "virtio-blk-mmio", **extra}})
    assert (request.addr, request.lun, request.slot) == (addr, lun, slot)


@pytest.mark.parametrize("arguments, desc", [
    ({"driver": "virtio-blk-mmio"}, "Parameter 'id' is missing"),
    ({"id": "d"}, "Parameter 'driver' is missing"),
    ({"id": "d", "driver": "virtio-blk-mmio", "addr": "-1"},
     "Parameter 'addr' expects a slot number such as '0x1' (hexadecimal) or '1' (decimal)"),
    ({"id": "d", "driver": "virtio-blk-mmio", "addr": "4294967296"},
     "Parameter 'addr' expects a slot number such as '0x1' (hexadecimal) or '1' (decimal)"),
    ({"id": "d", "driver": "virtio-blk-mmio", "addr": " 1"},
     "Parameter 'addr' expects a slot number such as '0x1' (hexadecimal) or '1' (decimal)"),
    ({"id": "d", "driver": "virtio-blk-mmio", "addr": "0xg"},
     "Parameter 'addr' expects a slot number such as '0x1' (hexadecimal) or '1' (decimal)"),
    ({"id": "d", "driver": "virtio-blk-mmio", "addr": "0x"},
     "Parameter 'addr' expects a slot number such as '0x1' (hexadecimal) or '1' (decimal)"),
    ({"id": "d", "driver": "virtio-blk-mmio", "addr": "0x123456789"},
     "Parameter 'addr' expects a slot number such as '0x1' (hexadecimal) or '1' (decimal)"),
    ({"id": "d", "driver": "virtio-blk-mmio", "addr": -1},
     "Parameter 'addr' expects a slot number such as '0x1' (hexadecimal) or '1' (decimal)"),
    ({"id": "d", "driver": "virtio-blk-mmio", "addr": True},
     "Parameter 'addr' expects a slot number such as '0x1' (hexadecimal) or '1' (decimal)"),
    ({"id": "d", "driver": "virtio-blk-mmio", "lun": "1"}, "Parameter 'lun' expects an integer"),
    ({"id": "d", "driver": "virtio-blk-mmio", "lun": -1},
     "Parameter 'lun' expects an integer from 0 to 4294967295"),
    ({"id": "d", "driver": "virtio-blk-mmio", "slot": 1}, "Invalid parameter 'slot'"),
])
def test_device_add_rejects(arguments, desc):
    assert bad_args("device_add", arguments) == desc


def test_device_del_seed_transcript():
    assert parse_text('{"execute": "device_del", "arguments": {"id": "drive-0"}}').request == \
        DeviceDel("drive-0")
    assert bad_args("device_del", {}) == "Parameter 'id' is missing"
    assert bad_args("device_del", {"id": None}) == "Parameter 'id' expects a string"


# -- balloon ------------------------------------------------------------------------------------

def test_balloon_seed_transcript():
    assert parse_text('{"execute": "balloon", "arguments": {"value": 2147483648}}').request == \
        Balloon(2147483648)
    assert parse({"execute": "balloon", "arguments": {"value": 2**64 - 1}}) == Balloon(2**64 - 1)


@pytest.mark.parametrize("arguments, desc", [
    ({}, "Parameter 'value' is missing"),
    ({"value": "2G"}, "Parameter 'value' expects an integer"),
    ({"value": 1.5}, "Parameter 'value' expects an integer"),
    ({"value": 2147483648.0}, "Parameter 'value' expects an integer"),
    ({"value": True}, "Parameter 'value' expects an integer"),
    ({"value": -1}, "Parameter 'value' expects an integer from 0 to 18446744073709551615"),
    ({"value": 2**64}, "Parameter 'value' expects an integer from 0 to 18446744073709551615"),
    ({"value": 1, "foo": 1}, "Invalid parameter 'foo'"),
])
def test_balloon_rejects(arguments, desc):
    assert bad_args("balloon", arguments) == desc


# -- qom-get / qom-set (the balloon's statistics) ------------------------------------------------

def test_qom_commands_parse():
    path = "/machine/peripheral/balloon"
    assert parse({"execute": "qom-get", "arguments": {"path": path, "property": "guest-stats"}}) == \
        QomGet(path, "guest-stats")
    assert parse({"execute": "qom-set", "arguments": {
        "path": path, "property": "guest-stats-polling-interval", "value": 2}}) == \
        QomSet(path, "guest-stats-polling-interval", 2)


@pytest.mark.parametrize("execute, arguments, desc", [
    ("qom-get", {"path": "/p"}, "Parameter 'property' is missing"),
    ("qom-get", {"path": 1, "property": "x"}, "Parameter 'path' expects a string"),
    ("qom-get", {"path": "/p", "property": "x", "value": 1}, "Invalid parameter 'value'"),
    ("qom-set", {"path": "/p", "property": "x"}, "Parameter 'value' is missing"),
    ("qom-set", {"path": "/p", "property": "x", "value": None},
     "Parameter 'value' expects a number, a string or a boolean"),
    ("qom-set", {"path": "/p", "property": "x", "value": [1]},
     "Parameter 'value' expects a number, a string or a boolean"),
])
def test_qom_rejects(execute, arguments, desc):
    assert bad_args(execute, arguments) == desc


def test_guest_stats_bytes_in_qemu_names_and_order():
    out = json.loads(encode_return(BalloonGuestStats(
        last_update=1795642956, values={"free-memory": 1 << 30, "total-memory": 4 << 30})))
    assert list(out["return"]) == ["last-update", "stats"]
    stats = out["return"]["stats"]
    assert list(stats) == ["stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults",
                           "stat-free-memory", "stat-total-memory", "stat-available-memory",
                           "stat-disk-caches", "stat-htlb-pgalloc", "stat-htlb-pgfail"]
    assert stats["stat-free-memory"] == 1 << 30 and stats["stat-total-memory"] == 4 << 30
    assert stats["stat-swap-in"] == 2**64 - 1  # unset, as QEMU shows it
    assert encode_return(5) == b'{"return":5}\n'


# -- results: exact bytes in the seed's key order -----------------------------------------------

def test_query_status_running_matches_seed():
    assert encode_return(StatusInfo(RunState.RUNNING)) == \
        b'{"return":{"running":true,"singlestep":false,"status":"running"}}\n'


def test_query_status_paused_is_truthful():
    # StratoVirt 0.x said running:true here; QEMU and later StratoVirt say false, as do we.
    assert encode_return(StatusInfo(RunState.PAUSED)) == \
        b'{"return":{"running":false,"singlestep":false,"status":"paused"}}\n'
    assert StatusInfo(RunState.PRELAUNCH).running is False


def test_query_cpus_matches_seed():
    cpus = [CpuInfo(i, CpuProps(socket_id=i), f"/machine/unattached/device[{i}]", 8439 + i)
            for i in range(2)]
    assert encode_return(cpus) == (
        b'{"return":[{"CPU":0,"arch":"x86","current":true,"halted":false,"props":{"core-id":0,'
        b'"socket-id":0,"thread-id":0},"qom_path":"/machine/unattached/device[0]",'
        b'"thread_id":8439},'
        b'{"CPU":1,"arch":"x86","current":true,"halted":false,"props":{"core-id":0,"socket-id":1,'
        b'"thread-id":0},"qom_path":"/machine/unattached/device[1]","thread_id":8440}]}\n')


def test_query_hotpluggable_cpus_matches_seed_and_omits_offline_qom_path():
    cpus = [HotpluggableCpu(CpuProps(socket_id=i), f"/machine/unattached/device[{i}]")
            for i in range(2)]
    assert encode_return(cpus) == (
        b'{"return":[{"props":{"core-id":0,"socket-id":0,"thread-id":0},"qom-path":'
        b'"/machine/unattached/device[0]","type":"host-x86-cpu","vcpus-count":1},{"props":'
        b'{"core-id":0,"socket-id":1,"thread-id":0},"qom-path":"/machine/unattached/device[1]",'
        b'"type":"host-x86-cpu","vcpus-count":1}]}\n')
    assert encode_return([HotpluggableCpu(CpuProps(socket_id=2), None)]) == (
        b'{"return":[{"props":{"core-id":0,"socket-id":2,"thread-id":0},'
        b'"type":"host-x86-cpu","vcpus-count":1}]}\n')


def test_other_results():
    assert encode_return(None) == b'{"return":{}}\n'
    assert encode_return(BalloonInfo(2147483648)) == b'{"return":{"actual":2147483648}}\n'
    assert encode_return(VERSION, 1) == \
        b'{"return":{"qemu":{"micro":1,"minor":0,"major":4},"package":""},"id":1}\n'
    assert encode_return([CommandInfo("stop")]) == b'{"return":[{"name":"stop"}]}\n'
    assert encode_return([]) == b'{"return":[]}\n'


def test_unknown_result_type_is_a_programming_error():
    with pytest.raises(TypeError):
        encode_return(object())


def test_error_bytes():
    assert encode_error(ErrorClass.DEVICE_NOT_ACTIVE, "No balloon device has been activated") == \
        (b'{"error":{"class":"DeviceNotActive","desc":"No balloon device has been activated"}}\n')
    assert [c.value for c in ErrorClass] == ["GenericError", "CommandNotFound", "DeviceNotFound",
                                             "DeviceNotActive", "KVMMissingCap",
                                             "OperationThrottled"]


# -- events -------------------------------------------------------------------------------------

TS = 1583908726_162739_000  # nanoseconds


@pytest.mark.parametrize("event, line", [
    (StopEvent(), b'{"event":"STOP","data":{},'
                  b'"timestamp":{"seconds":1583908726,"microseconds":162739}}\n'),
    (ResumeEvent(), b'{"event":"RESUME","data":{},'
                    b'"timestamp":{"seconds":1583908726,"microseconds":162739}}\n'),
    (ShutdownEvent(False, ShutdownReason.HOST_QMP_QUIT),
     b'{"event":"SHUTDOWN","data":{"guest":false,"reason":"host-qmp-quit"},'
     b'"timestamp":{"seconds":1583908726,"microseconds":162739}}\n'),
    (ShutdownEvent(True, ShutdownReason.GUEST_SHUTDOWN),
     b'{"event":"SHUTDOWN","data":{"guest":true,"reason":"guest-shutdown"},'
     b'"timestamp":{"seconds":1583908726,"microseconds":162739}}\n'),
    (DeviceDeletedEvent("drive-0", "drive-0"),
     b'{"event":"DEVICE_DELETED","data":{"device":"drive-0","path":"drive-0"},'
     b'"timestamp":{"seconds":1583908726,"microseconds":162739}}\n'),
    (BalloonChangedEvent(2147483648),
     b'{"event":"BALLOON_CHANGED","data":{"actual":2147483648},'
     b'"timestamp":{"seconds":1583908726,"microseconds":162739}}\n'),
    # QEMU 7.2's BLOCK_IO_ERROR: qapi member order, node-name and nospace optional.
    (BlockIoErrorEvent("", "drive-0", IoOperation.WRITE, BlockErrorAction.REPORT, True,
                       "No space left on device"),
     b'{"event":"BLOCK_IO_ERROR","data":{"device":"","node-name":"drive-0","operation":"write",'
     b'"action":"report","nospace":true,"reason":"No space left on device"},'
     b'"timestamp":{"seconds":1583908726,"microseconds":162739}}\n'),
    (BlockIoErrorEvent("rootfs", None, IoOperation.READ, BlockErrorAction.REPORT, None,
                       "Input/output error"),
     b'{"event":"BLOCK_IO_ERROR","data":{"device":"rootfs","operation":"read","action":"report",'
     b'"reason":"Input/output error"},'
     b'"timestamp":{"seconds":1583908726,"microseconds":162739}}\n'),
])
def test_event_bytes(event, line):
    assert encode_event(event, TS) == line


def test_shutdown_reason_may_be_given_as_its_text():
    assert b'"reason":"host-qmp-quit"' in encode_event(ShutdownEvent(False, "host-qmp-quit"), 0)


def test_line_end_is_the_callers():
    assert encode_event(StopEvent(), TS, b"\r\n").endswith(b"}}\r\n")
    assert encode_return(None, 1, b"\r\n") == b'{"return":{},"id":1}\r\n'
    assert encode_error(ErrorClass.GENERIC_ERROR, "x", None, b"\r\n") == \
        b'{"error":{"class":"GenericError","desc":"x"}}\r\n'


def test_event_timestamp_split():
    assert encode_event(StopEvent(), 999_999_999).endswith(
        b'"timestamp":{"seconds":0,"microseconds":999999}}\n')


def test_unknown_event_type_is_a_programming_error():
    with pytest.raises(TypeError):
        encode_event("STOP", 0)


# -- migrate / query-migrate (snapshots) ----------------------------------------------------------

def test_migrate_to_a_directory_as_hydropper_sends_it():
    from pystratovirt.machine.requests import Migrate
    assert parse_text('{"execute": "migrate", "arguments": {"uri": "file:/var/tmp/snapshot_template"}}').request \
        == Migrate("/var/tmp/snapshot_template")
    assert parse({"execute": "migrate", "arguments": {"uri": "file:rel/dir", "detach": True}}) == Migrate("rel/dir")


@pytest.mark.parametrize("arguments, desc", [
    ({}, "Parameter 'uri' is missing"),
    ({"uri": ""}, "Parameter 'uri' expects a non-empty string"),
    ({"uri": "file:"}, "Parameter 'uri' expects 'file:' followed by a directory"),
    ({"uri": "/var/tmp/x"}, "Parameter 'uri' expects a URI of the form 'file:DIR'"),
    ({"uri": "ftp:host"}, "Parameter 'uri' expects a URI of the form 'file:DIR'"),
    ({"uri": "tcp:192.168.0.1:4446"},
     "Migration to 'tcp:' is not supported: only snapshots to a directory ('file:DIR') are."),
    ({"uri": "unix:/tmp/m.sock"},
     "Migration to 'unix:' is not supported: only snapshots to a directory ('file:DIR') are."),
    ({"uri": "exec:cat > /tmp/x"},
     "Migration to 'exec:' is not supported: only snapshots to a directory ('file:DIR') are."),
    ({"uri": "file:/d", "blk": True}, "Invalid parameter 'blk'"),
])
def test_migrate_rejects(arguments, desc):
    assert bad_args("migrate", arguments) == desc


def test_query_migrate_in_qemu_names():
    from pystratovirt.machine.requests import MigrationInfo, MigrationRam, MigrationStatus, QueryMigrate
    assert parse({"execute": "query-migrate"}) == QueryMigrate()
    assert encode_return(MigrationInfo(MigrationStatus.NONE)) == b'{"return":{"status":"none"}}\n'
    done = MigrationInfo(MigrationStatus.COMPLETED, total_time_ms=14,
                         ram=MigrationRam(151552, 0, 268435456, 65499, 37, 151552))
    assert json.loads(encode_return(done)) == {"return": {
        "status": "completed", "total-time": 14,
        "ram": {"transferred": 151552, "remaining": 0, "total": 268435456, "duplicate": 65499,
                "normal": 37, "normal-bytes": 151552}}}
    failed = MigrationInfo(MigrationStatus.FAILED, total_time_ms=2, error_desc="Cannot save the snapshot.")
    assert encode_return(failed) == \
        b'{"return":{"status":"failed","total-time":2,"error-desc":"Cannot save the snapshot."}}\n'
