"""The two dialects on the wire (0.x: the seed's greeting and ``\\n``; 2.x: StratoVirt 2.3.0's
greeting and ``\\r\\n``), and the replies decoded the way Kata's govmm (Go) and Kuasar's qapi-rs
(serde) decode them. The machine behind the server is the fake."""

import json

import pytest

from helpers.decoders import (
    GO_CPU_INFO,
    GO_GREETING,
    GO_STATUS,
    DecodeError,
    go_decode,
    serde_cpu_infos,
    serde_greeting,
    serde_status,
)
from pystratovirt.machine.requests import RunState, StopEvent
from pystratovirt.qmp.schema import GREETING
from pystratovirt.qmp.server import QmpServer
from pystratovirt.qmp.wire import WIRE_0X, WIRE_2X

GREETING_2X = (b'{"QMP":{"version":{"qemu":{"micro":1,"minor":0,"major":5},'
               b'"package":"StratoVirt-2.3.0"},"capabilities":[]}}\r\n')


@pytest.fixture
def server_2x(tmp_path, loop_thread, qmp_kit):
    machine = qmp_kit.FakeMachine()
    server = QmpServer(loop_thread.loop, tmp_path / "q.sock", machine, wire=WIRE_2X)
    machine.server = server
    loop_thread.call(server.start)
    yield server
    loop_thread.call(server.close)


def test_the_default_dialect_is_the_seeds(qmp, client):
    assert qmp.server.wire is WIRE_0X
    assert client.line() == GREETING
    assert client.ask(b'{"execute":"query-version"}') == \
        b'{"return":{"qemu":{"micro":1,"minor":0,"major":4},"package":""}}\n'


def test_2x_greeting_and_line_ends(server_2x, connect, loop_thread):
    c = connect(server_2x.path)
    assert c.line() == GREETING_2X
    assert c.ask(b'{"execute":"query-status"}') == \
        b'{"return":{"running":true,"singlestep":false,"status":"running"}}\r\n'
    assert c.ask(b'{"execute":"query-version","id":1}') == \
        b'{"return":{"qemu":{"micro":1,"minor":0,"major":5},"package":"StratoVirt-2.3.0"},' \
        b'"id":1}\r\n'
    assert c.ask(b'{"execute":"nope"}') == \
        b'{"error":{"class":"CommandNotFound","desc":"The command nope has not been found"}}\r\n'
    c.send(b'{"execute":"x"')  # an unfinished message, abandoned by the 0xFF below
    c.send(b'\xff{"execute":"stop"}')
    event = c.line()
    assert event.endswith(b"}\r\n") and json.loads(event)["event"] == "STOP"
    assert c.line() == b'{"return":{}}\r\n'
    loop_thread.call(lambda: server_2x.emit(StopEvent()))
    assert c.line().endswith(b"}}\r\n")
    assert c.ask(b'{"execute":"query-status","arguments":{"x":"' + b"a" * 70000 + b'"}}') == \
        b'{"error":{"class":"GenericError","desc":"Message is too long (limit 65536 bytes)"}}\r\n'


def test_govmm_accepts_the_2x_greeting_and_refuses_the_0x_one():
    for line, major in ((GREETING_2X, 5), (GREETING, 4)):
        greeting = json.loads(line)
        go_decode(greeting, GO_GREETING, "greeting")
        serde_greeting(greeting)
        # govmm's version gate (QMPStartWithConn): major < 5 is refused.
        assert greeting["QMP"]["version"]["qemu"]["major"] == major
    assert json.loads(GREETING_2X)["QMP"]["version"]["qemu"]["major"] >= 5


def test_replies_decode_as_go_and_serde_need(qmp, client):
    client.line()
    cpus = json.loads(client.ask(b'{"execute":"query-cpus"}'))["return"]
    go_decode(cpus, [GO_CPU_INFO], "CPUInfo")
    serde_cpu_infos(cpus)
    assert all(c["thread_id"] > 0 for c in cpus)  # Kata keeps only thread_id > 0
    for state in (RunState.RUNNING, RunState.PAUSED, RunState.PRELAUNCH):
        qmp.machine.state = state
        status = json.loads(client.ask(b'{"execute":"query-status"}'))["return"]
        go_decode(status, GO_STATUS, "status")
        serde_status(status)
        assert list(status) == ["running", "singlestep", "status"]


@pytest.mark.parametrize("bad", [
    {"CPU": "0"}, {"thread_id": 1.5}, {"current": 1}, {"qom_path": None, "halted": "no"},
    {"props": {"socket-id": True}},
])
def test_the_go_decoder_is_as_strict_as_go(bad):
    cpu = {"CPU": 0, "arch": "x86", "current": True, "halted": False, "qom_path": "/x",
           "thread_id": 5, "props": {"core-id": 0, "socket-id": 0, "thread-id": 0}}
    go_decode([cpu], [GO_CPU_INFO])
    with pytest.raises(DecodeError):
        go_decode([{**cpu, **bad}], [GO_CPU_INFO])


@pytest.mark.parametrize("drop", ["arch", "CPU", "current", "halted", "qom_path", "thread_id"])
def test_the_serde_decoder_needs_every_field(drop):
    cpu = {"CPU": 0, "arch": "x86", "current": True, "halted": False, "qom_path": "/x",
           "thread_id": 5}
    serde_cpu_infos([cpu])
    with pytest.raises(DecodeError):
        serde_cpu_infos([{k: v for k, v in cpu.items() if k != drop}])
    with pytest.raises(DecodeError):
        serde_status({"running": True, "singlestep": False, "status": "walking"})
