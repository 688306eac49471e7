"""Back-pressure: a client that reads slowly gets every reply, in order; one that stops reading
costs bounded memory and is dropped only after making no progress for ``stall_timeout``.

The server runs alone on a real EventLoop thread with the fake machine (tests/qmp/conftest.py);
tests/integration/test_qmp_hardening.py repeats the first case against the real VMM.
"""

import json
import logging
import socket
import threading
import time

import pytest

from pystratovirt.machine.requests import BalloonChangedEvent
from pystratovirt.qmp.schema import GREETING
from pystratovirt.qmp.server import QmpServer

STATUS = b'{"execute":"query-status"}'
RUNNING = b'{"return":{"running":true,"singlestep":false,"status":"running"}}\n'


@pytest.fixture
def make_server(tmp_path, loop_thread, qmp_kit):
    """``make_server(**options)``: a started server with a fake machine listing 254 vCPU slots
    (each query-hotpluggable-cpus reply is about 24 KiB)."""
    servers = []

    def make(**options):
        machine = qmp_kit.FakeMachine()
        machine.max_cpus = 254
        server = QmpServer(loop_thread.loop, tmp_path / f"q{len(servers)}.sock", machine,
                           **options)
        machine.server = server
        loop_thread.call(server.start)
        servers.append(server)
        return server
    yield make
    for server in servers:
        loop_thread.call(server.close)


def pipelined(n: int) -> bytes:
    return b"".join(b'{"execute":"query-hotpluggable-cpus","id":%d}\n' % i for i in range(n))


def sender(sock: socket.socket, data: bytes) -> threading.Thread:
    """Write ``data`` on a thread (the write blocks while the server applies back-pressure)."""
    def run():
        try:
            sock.sendall(data)
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def reply_ids(client, n: int, pause: float = 0.0) -> list:
    ids = []
    for _ in range(n):
        msg = json.loads(client.line())
        assert "return" in msg, msg
        ids.append(msg["id"])
        if pause:
            time.sleep(pause)
    return ids


def test_a_slow_reader_gets_every_reply_in_order(make_server, connect):
    # Before back-pressure, the server buffered replies up to max_output and then dropped the
    # client: with a reader this slow only a few dozen of the 1000 replies arrived, then EOF.
    server = make_server(max_output=256 * 1024)
    c = connect(server.path)
    assert c.line() == GREETING
    t = sender(c.sock, pipelined(1000))
    assert reply_ids(c, 1000, pause=0.002) == list(range(1000))
    t.join(5)
    assert c.ask(STATUS) == RUNNING


def test_input_is_not_read_while_output_is_pending(make_server, connect, loop_thread):
    server = make_server(max_output=64 * 1024)
    c = connect(server.path)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # what is in flight is small
    assert c.line() == GREETING
    t = sender(c.sock, pipelined(1000))  # ~46 KB of commands
    time.sleep(0.5)
    # Nothing read on our side: the server answered up to its bound and stopped there, and its
    # stopping made our own write block instead of piling replies up in the VMM.
    assert t.is_alive()
    unsent = loop_thread.call(lambda: server.unsent)
    assert 64 * 1024 < unsent <= 64 * 1024 + 30 * 1024  # the bound plus at most one reply
    assert loop_thread.call(lambda: server.connected)
    assert reply_ids(c, 1000) == list(range(1000))
    t.join(5)
    assert not t.is_alive()


def test_events_for_a_client_that_does_not_read_are_bounded(make_server, connect, loop_thread,
                                                            caplog):
    server = make_server(max_output=8192, max_events=8192)
    c = connect(server.path)
    assert c.line() == GREETING
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with caplog.at_level(logging.WARNING, logger="pystratovirt.qmp.server"):
        loop_thread.call(lambda: [server.emit(BalloonChangedEvent(i)) for i in range(20000)])
        assert loop_thread.call(lambda: server.unsent) <= 8192 + 8192 + 200
        assert "discarding events until it does" in caplog.text
        # Reading resumes: the queued events arrive in order (the discarded ones never will),
        # and a command sent now is still answered.
        c.send(STATUS)
        actual = []
        while True:
            line = c.line()
            if line == RUNNING:
                break
            actual.append(json.loads(line)["data"]["actual"])
        assert actual == list(range(len(actual))) and 0 < len(actual) < 20000
        assert "event(s) were discarded while it was not" in caplog.text
    assert loop_thread.call(lambda: server.connected)


def test_a_client_that_stops_reading_for_good_is_dropped(make_server, connect, loop_thread,
                                                         caplog):
    server = make_server(max_output=16 * 1024, stall_timeout=0.5)
    hog = connect(server.path)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sender(hog.sock, pipelined(200))
    waiting = connect(server.path)  # queued behind the hog
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pystratovirt.qmp.server"):
        assert waiting.line() == GREETING  # greeted once the hog is dropped
    elapsed = time.monotonic() - start
    assert 0.4 < elapsed < 5
    assert "accepted no output for" in caplog.text and "dropping it" in caplog.text
    assert waiting.ask(STATUS) == RUNNING


def test_a_slow_but_steady_reader_is_never_dropped(make_server, connect, loop_thread):
    server = make_server(max_output=16 * 1024, stall_timeout=0.5)
    # Reading 16 KiB every 0.1 s frees room in the server's socket only in whole kernel buffers,
    # and the socket reports writable again only when three quarters of its buffer are free
    # (about a second here): longer than stall_timeout, so this also checks that progress is
    # measured by what the reader consumed, not by when the server could write.
    c = connect(server.path)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert c.line() == GREETING
    t = sender(c.sock, pipelined(20))  # ~480 KB of replies, read 16 KiB every 0.1 s
    received = b""
    deadline = time.monotonic() + 30
    while received.count(b"\n") < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
        chunk = c.sock.recv(16 * 1024)
        assert chunk, "dropped while it was reading"
        received += chunk
    ids = [json.loads(line)["id"] for line in (c.buf + received).splitlines()]
    assert ids == list(range(20))
    t.join(5)
    assert loop_thread.call(lambda: server.connected)


def test_half_closed_client_gets_every_queued_reply(make_server, connect):
    server = make_server(max_output=16 * 1024)
    c = connect(server.path)
    assert c.line() == GREETING
    c.send(pipelined(100) + b'{"execute":"stop","id":"last"}')
    c.sock.shutdown(socket.SHUT_WR)
    assert reply_ids(c, 100, pause=0.001) == list(range(100))
    assert json.loads(c.line())["event"] == "STOP"  # the last command's event, then its reply
    assert c.line() == b'{"return":{},"id":"last"}\n'
    assert c.sock.recv(1) == b""  # then the server hangs up
