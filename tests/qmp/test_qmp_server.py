"""The QMP server on a real EventLoop thread, driven through a real unix socket.

The machine behind it is a fake (tests/qmp/conftest.py): these are unit tests of the server.
"""

import json
import os
import socket
import stat
import threading
import time

import pytest

from pystratovirt.machine.requests import BalloonChangedEvent, DeviceAdd, QueryStatus, RunState, StopEvent
from pystratovirt.qmp.schema import GREETING, MAX_MESSAGE, command_names
from pystratovirt.qmp.server import QmpServer, QmpSocketError

STATUS = b'{"execute":"query-status"}'
RUNNING = b'{"return":{"running":true,"singlestep":false,"status":"running"}}\n'
PAUSED = b'{"return":{"running":false,"singlestep":false,"status":"paused"}}\n'
EMPTY = b'{"return":{}}\n'


def event(line: bytes, name: str, data: dict) -> None:
    """Assert ``line`` is event ``name`` with ``data``, in the seed's key order, stamped now."""
    msg = json.loads(line)
    assert list(msg) == ["event", "data", "timestamp"]
    assert (msg["event"], msg["data"]) == (name, data)
    assert list(msg["timestamp"]) == ["seconds", "microseconds"]
    assert abs(msg["timestamp"]["seconds"] - time.time()) < 60
    assert 0 <= msg["timestamp"]["microseconds"] < 1_000_000


def silent(c, wait: float = 0.2) -> bool:
    """True if nothing arrives within ``wait`` seconds."""
    c.sock.settimeout(wait)
    try:
        c.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        c.sock.settimeout(5)
    return False


# -- greeting and basic exchange ----------------------------------------------------------------

def test_greeting_is_sent_at_once_with_exact_bytes(client):
    assert client.line() == (b'{"QMP":{"version":{"qemu":{"micro":1,"minor":0,"major":4},'
                             b'"package":""},"capabilities":[]}}\n')
    assert client.buf == b""


def test_query_status_without_capabilities_or_newline(client):
    client.line()
    assert client.ask(STATUS) == RUNNING
    assert client.ask(b'{"execute":"qmp_capabilities"}') == EMPTY
    assert client.ask(b'{ "execute": "query-status" }\n') == RUNNING


def test_several_commands_in_one_send_answered_in_order(client, qmp):
    client.line()
    client.send(b'{"execute":"query-status","id":1}{"execute":"query-balloon","id":2}\n'
                b'  {"execute":"nope","id":3}\r\n{"execute":"query-status","id":"4"}')
    assert client.line() == b'{"return":{"running":true,"singlestep":false,"status":"running"},' \
                            b'"id":1}\n'
    assert client.line() == b'{"return":{"actual":4294967296},"id":2}\n'
    assert client.line() == b'{"error":{"class":"CommandNotFound","desc":"The command nope has ' \
                            b'not been found"},"id":3}\n'
    assert client.line() == b'{"return":{"running":true,"singlestep":false,"status":"running"},' \
                            b'"id":"4"}\n'


def test_one_command_split_byte_by_byte(client):
    client.line()
    message = b'{"execute": "device_add", "arguments": {"id": "drive-0", ' \
              b'"driver": "virtio-blk-mmio", "addr": "0x1"}, "id": "split"}'
    for i in range(len(message)):
        client.send(message[i:i + 1])
        time.sleep(0.0005)  # give the loop a chance to read each byte on its own
    assert client.line() == b'{"return":{},"id":"split"}\n'


def test_requests_reach_the_machine_typed(client, qmp):
    client.line()
    client.ask(b'{"execute": "device_add", "arguments": {"id": "drive-0", '
               b'"driver": "virtio-blk-mmio", "addr": "0x1"}}')
    assert qmp.machine.requests == [DeviceAdd("drive-0", "virtio-blk-mmio", addr=1)]


def test_bad_arguments_never_reach_the_machine(client, qmp):
    client.line()
    assert client.ask(b'{"execute":"balloon","arguments":{"value":"big"},"id":1}') == \
        b'{"error":{"class":"GenericError","desc":"Parameter \'value\' expects an integer"},' \
        b'"id":1}\n'
    assert client.ask(b'{"execute":"device_del","arguments":{"foo":1}}') == \
        b'{"error":{"class":"GenericError","desc":"Invalid parameter \'foo\'"}}\n'
    assert client.ask(b'{"execute":"device_del"}') == \
        b'{"error":{"class":"GenericError","desc":"Parameter \'id\' is missing"}}\n'
    assert qmp.machine.requests == []


# -- events before replies ----------------------------------------------------------------------

def test_stop_cont_events_come_before_the_reply(client, qmp):
    client.line()
    client.send(b'{"execute":"stop"}')
    event(client.line(), "STOP", {})
    assert client.line() == EMPTY
    assert client.ask(STATUS) == PAUSED
    assert client.ask(b'{"execute":"stop","id":9}') == \
        b'{"error":{"class":"GenericError","desc":""},"id":9}\n'
    client.send(b'{"execute":"cont"}')
    event(client.line(), "RESUME", {})
    assert client.line() == EMPTY
    assert client.ask(STATUS) == RUNNING


def test_device_del_and_quit_events_come_before_the_reply(client):
    client.line()
    client.send(b'{"execute": "device_del", "arguments": {"id": "drive-0"}}')
    event(client.line(), "DEVICE_DELETED", {"device": "drive-0", "path": "drive-0"})
    assert client.line() == b'{"return":{}}\n'
    client.send(b'{"execute":"quit"}')
    event(client.line(), "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    assert client.line() == EMPTY


def test_machine_errors_keep_their_class(client, qmp):
    client.line()
    assert client.ask(b'{"execute":"device_del","arguments":{"id":"missing"}}') == \
        b'{"error":{"class":"GenericError","desc":"Device missing not found"}}\n'
    qmp.machine.memory = None
    assert client.ask(b'{"execute":"query-balloon"}') == \
        b'{"error":{"class":"DeviceNotActive","desc":"No balloon device has been activated"}}\n'


def test_emit_threadsafe_and_events_without_a_client(client, qmp, connect):
    # connect() has returned, so the loop accepts (and greets) before it runs the queued emit.
    qmp.server.emit_threadsafe(StopEvent())
    lines = [client.line(), client.line()]
    assert lines[0] == GREETING
    event(lines[1], "STOP", {})
    qmp.server.emit_threadsafe(BalloonChangedEvent(1 << 30))
    event(client.line(), "BALLOON_CHANGED", {"actual": 1 << 30})
    client.close()
    time.sleep(0.05)
    qmp.server.emit_threadsafe(StopEvent())  # nobody to tell: dropped
    qmp.lt.call(lambda: None)
    fresh = connect(qmp.path)
    assert fresh.line() == GREETING
    assert fresh.ask(STATUS) == RUNNING  # the dropped event never shows up
    fresh.close()


def test_server_answers_protocol_commands_itself(client, qmp):
    client.line()
    assert client.ask(b'{"execute":"query-version"}') == \
        b'{"return":{"qemu":{"micro":1,"minor":0,"major":4},"package":""}}\n'
    names = [c["name"] for c in json.loads(client.ask(b'{"execute":"query-commands"}'))["return"]]
    assert names == command_names()
    assert client.ask(b'{"execute":"qmp_capabilities","arguments":{"enable":[]}}') == EMPTY
    assert qmp.machine.requests == []


def test_executor_bug_costs_one_reply(client, qmp):
    def broken(request):
        raise RuntimeError("boom")
    qmp.machine.execute = broken
    client.line()
    assert client.ask(b'{"execute":"query-status","id":1}') == \
        b'{"error":{"class":"GenericError","desc":"Internal error while executing ' \
        b'query-status"},"id":1}\n'

    def wrong_type(request):
        return "not a result"
    qmp.machine.execute = wrong_type
    assert client.ask(STATUS).startswith(b'{"error":{"class":"GenericError"')
    del qmp.machine.execute
    assert client.ask(STATUS) == RUNNING


# -- bad input ----------------------------------------------------------------------------------

def test_malformed_json_is_answered_and_the_stream_resynchronizes(client):
    client.line()
    reply = json.loads(client.ask(b'{"execute": query-status}'))
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith("Invalid JSON: ")
    assert json.loads(client.ask(b"hello\n"))["error"]["desc"].startswith("Invalid JSON: ")
    assert client.ask(b"[1, 2]") == \
        b'{"error":{"class":"GenericError","desc":"QMP input must be a JSON object"}}\n'
    assert client.ask(b"42\n") == \
        b'{"error":{"class":"GenericError","desc":"QMP input must be a JSON object"}}\n'
    assert client.ask(STATUS) == RUNNING


def test_too_long_message_is_refused_and_the_connection_kept(client):
    client.line()
    long_message = b'{"execute":"quit","arguments":{"pad":"' + b"A" * MAX_MESSAGE + b'"}}'
    assert client.ask(long_message) == \
        b'{"error":{"class":"GenericError","desc":"Message is too long (limit 65536 bytes)"}}\n'
    assert client.ask(STATUS) == RUNNING
    # Exactly at the limit is still fine.
    pad = MAX_MESSAGE - len(b'{"execute":"query-status","id":""}')
    assert client.ask(b'{"execute":"query-status","id":"' + b"x" * pad + b'"}').startswith(
        b'{"return":{"running":true')


def test_ff_resets_a_confused_stream(client):
    client.line()
    client.send(b'{"execute":"stop","arguments":{"id":"')
    assert client.ask(b"\xff" + STATUS) == RUNNING


def test_half_closed_client_still_gets_its_replies(qmp, connect):
    c = connect(qmp.path)
    c.line()
    c.send(STATUS + b'{"execute":"stop"}')
    c.sock.shutdown(socket.SHUT_WR)
    assert c.line() == RUNNING
    event(c.line(), "STOP", {})
    assert c.line() == EMPTY
    assert c.sock.recv(1) == b""  # then the server hangs up
    c.close()
    again = connect(qmp.path)
    assert again.line() == GREETING
    again.close()


def test_client_that_vanishes_mid_reply_does_not_hurt(qmp, connect):
    for _ in range(20):
        c = connect(qmp.path)
        c.send(b'{"execute":"query-cpus"}' * 50)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        c.close()
    c = connect(qmp.path)
    assert c.line() == GREETING
    assert c.ask(STATUS) == RUNNING
    c.close()


# -- one client at a time -----------------------------------------------------------------------

def test_second_client_waits_and_is_greeted_when_the_first_leaves(qmp, connect):
    first = connect(qmp.path)
    assert first.line() == GREETING
    second = connect(qmp.path)  # connect() succeeds: the kernel backlog holds it
    assert silent(second)
    assert first.ask(STATUS) == RUNNING  # the first is served meanwhile
    first.close()
    assert second.line() == GREETING
    assert second.ask(STATUS) == RUNNING
    second.close()


def test_reconnecting_always_works(qmp, connect):
    for _ in range(30):
        c = connect(qmp.path)
        assert c.line() == GREETING
        assert c.ask(STATUS) == RUNNING
        c.close()


def test_client_leaving_without_reading_the_greeting(qmp, connect):
    for _ in range(10):
        connect(qmp.path).close()
    c = connect(qmp.path)
    assert c.line() == GREETING
    c.close()


# -- the socket file ----------------------------------------------------------------------------

def test_socket_is_0600_and_removed_on_close(tmp_path, loop_thread, qmp_kit):
    server = QmpServer(loop_thread.loop, tmp_path / "s.sock", qmp_kit.FakeMachine())
    old_umask = os.umask(0)  # even a permissive umask must not widen it
    try:
        loop_thread.call(server.start)
    finally:
        os.umask(old_umask)
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    loop_thread.call(server.close)
    assert not os.path.exists(server.path)
    loop_thread.call(server.close)  # idempotent


@pytest.mark.parametrize("existing", ["socket", "file"])
def test_refuses_an_existing_path(tmp_path, loop_thread, existing, qmp_kit):
    path = tmp_path / "s.sock"
    if existing == "socket":
        leftover = socket.socket(socket.AF_UNIX)
        leftover.bind(str(path))
        leftover.close()
    else:
        path.write_text("keep me")
    server = QmpServer(loop_thread.loop, path, qmp_kit.FakeMachine())
    with pytest.raises(QmpSocketError) as info:
        server.start()
    assert str(info.value) == f"QMP socket path {path} already exists; remove it or choose " \
                              f"another path."
    assert path.exists()  # never unlinked
    server.close()
    assert path.exists()


def test_unusable_path_is_a_clear_error(tmp_path, loop_thread, qmp_kit):
    with pytest.raises(QmpSocketError, match="Cannot create QMP socket .*"):
        QmpServer(loop_thread.loop, tmp_path / "no-such-dir" / "s.sock",
                  qmp_kit.FakeMachine()).start()
    with pytest.raises(QmpSocketError, match="Cannot create QMP socket"):
        QmpServer(loop_thread.loop, tmp_path / ("x" * 200), qmp_kit.FakeMachine()).start()


def test_close_does_not_remove_a_file_that_replaced_ours(tmp_path, loop_thread, qmp_kit):
    server = QmpServer(loop_thread.loop, tmp_path / "s.sock", qmp_kit.FakeMachine())
    loop_thread.call(server.start)
    os.unlink(server.path)
    with open(server.path, "w") as f:
        f.write("someone else's")
    loop_thread.call(server.close)
    assert os.path.exists(server.path)


def test_relative_path_is_made_absolute(tmp_path, loop_thread, monkeypatch, qmp_kit):
    monkeypatch.chdir(tmp_path)
    server = QmpServer(loop_thread.loop, "rel.sock", qmp_kit.FakeMachine())
    assert server.path == str(tmp_path / "rel.sock")


def test_no_executor_yet(tmp_path, loop_thread, connect):
    server = QmpServer(loop_thread.loop, tmp_path / "s.sock", None)
    loop_thread.call(server.start)
    c = connect(server.path)
    c.line()
    assert c.ask(STATUS) == \
        b'{"error":{"class":"GenericError","desc":"The virtual machine is not ready"}}\n'
    assert c.ask(b'{"execute":"qmp_capabilities"}') == EMPTY
    c.close()
    loop_thread.call(server.close)


# -- quit: the loop stops, then close() flushes the last reply ----------------------------------

def test_close_after_quit_flushes_the_reply_and_removes_the_socket(tmp_path, connect, qmp_kit):
    lt = qmp_kit.LoopThread()
    machine = qmp_kit.FakeMachine()
    server = QmpServer(lt.loop, tmp_path / "q.sock", machine)
    machine.server = server

    def quit_like_the_machine() -> None:
        # Queue more output than the kernel socket buffer holds, then stop the loop, so the
        # reply is still unsent when the loop ends and only close() can deliver it.
        for _ in range(3000):
            server.emit(BalloonChangedEvent(1))
        lt.loop.stop()
    machine.on_quit = quit_like_the_machine
    lt.call(server.start)
    c = connect(server.path)
    c.line()
    c.send(b'{"execute":"quit","id":"bye"}')
    lt.thread.join(5)
    assert not lt.thread.is_alive()

    lines = []

    def reader():
        while True:
            try:
                lines.append(c.line())
            except EOFError:
                return
    t = threading.Thread(target=reader)
    t.start()
    server.close(timeout=5)  # after the loop has stopped, on this thread
    t.join(5)
    assert lines[-1] == b'{"return":{},"id":"bye"}\n'
    event(lines[-2], "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    assert len(lines) == 3000 + 2
    assert not os.path.exists(server.path)
    lt.loop.close()


def test_flush_gives_up_after_its_timeout(qmp, connect):
    c = connect(qmp.path)
    c.line()
    qmp.lt.call(lambda: [qmp.server.emit(BalloonChangedEvent(1)) for _ in range(5000)])
    start = time.monotonic()
    assert qmp.lt.call(lambda: qmp.server.flush(timeout=0.2)) is False
    assert time.monotonic() - start < 2
    c.close()


def test_status_reflects_the_machine(client, qmp):
    client.line()
    qmp.machine.state = RunState.PRELAUNCH
    assert client.ask(STATUS) == \
        b'{"return":{"running":false,"singlestep":false,"status":"prelaunch"}}\n'
    assert qmp.machine.requests == [QueryStatus()]


def test_close_after_the_loop_is_closed(tmp_path, connect, qmp_kit):
    lt = qmp_kit.LoopThread()
    server = QmpServer(lt.loop, tmp_path / "q.sock", qmp_kit.FakeMachine())
    lt.call(server.start)
    c = connect(server.path)
    assert c.line() == GREETING
    c.sock.shutdown(socket.SHUT_WR)
    lt.stop()  # stops and closes the loop
    server.close()
    assert not os.path.exists(server.path)
    assert c.sock.recv(1) == b""
