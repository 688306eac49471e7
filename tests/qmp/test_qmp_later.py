"""Replies that come later: a command the machine answers with a Future (stop waiting for the
vCPUs, a hot-plug waiting for a device's I/O thread) holds back that client's next commands,
not the control loop; its events still come before its reply."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future

import pytest

from pystratovirt.machine.requests import DeviceDel, DeviceDeletedEvent, MachineError
from pystratovirt.qmp.server import QmpServer

EMPTY = b'{"return":{}}\n'


class SlowMachine:
    """Answers device_del with a Future the test completes; everything else at once."""

    def __init__(self, lt):
        self.lt = lt
        self.server = None
        self.pending: list[tuple[str, Future]] = []
        self.ready = threading.Event()

    def execute(self, request):
        if isinstance(request, DeviceDel):
            done: Future = Future()
            self.pending.append((request.id, done))
            self.ready.set()
            return done
        return None  # query-status and the rest: {"return":{}} is enough here

    def finish(self, index=0, error=None):
        """Complete a pending device_del from another thread, as a device's I/O thread does."""
        dev, future = self.pending[index]

        def on_loop():  # the machine emits its event on the loop, then completes the reply
            if error is None:
                self.server.emit(DeviceDeletedEvent(dev, dev))
                future.set_result(None)
            else:
                future.set_exception(error)
        threading.Thread(target=lambda: self.lt.loop.call_soon_threadsafe(on_loop)).start()


@pytest.fixture
def slow(tmp_path, loop_thread, qmp_kit):
    machine = SlowMachine(loop_thread)
    server = QmpServer(loop_thread.loop, tmp_path / "q.sock", machine)
    machine.server = server
    loop_thread.call(server.start)
    client = qmp_kit.RawClient(server.path)
    client.line()  # greeting
    yield machine, client, loop_thread
    client.close()
    loop_thread.call(server.close)


def test_later_reply_keeps_order_and_events_first(slow):
    machine, client, lt = slow
    client.send(b'{"execute":"device_del","arguments":{"id":"d1"}}'
                b'{"execute":"query-status","id":7}')
    assert machine.ready.wait(5)
    # The loop is free meanwhile (it runs this), and the next command waits for the first.
    assert lt.call(lambda: len(machine.pending)) == 1
    client.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.line()
    client.sock.settimeout(5)
    machine.finish()
    ev = json.loads(client.line())
    assert (ev["event"], ev["data"]) == ("DEVICE_DELETED", {"device": "d1", "path": "d1"})
    assert client.line() == EMPTY
    assert client.line() == b'{"return":{},"id":7}\n'


def test_a_later_error_is_the_commands_error(slow):
    machine, client, _ = slow
    client.send(b'{"execute":"device_del","arguments":{"id":"d2"},"id":"x"}')
    assert machine.ready.wait(5)
    machine.finish(error=MachineError("Device d2 not found"))
    assert json.loads(client.line()) == {"error": {"class": "GenericError", "desc": "Device d2 not found"},
                                         "id": "x"}


def test_a_client_leaving_while_its_command_runs_costs_nothing(slow, qmp_kit):
    machine, client, lt = slow
    client.send(b'{"execute":"device_del","arguments":{"id":"d3"}}')
    assert machine.ready.wait(5)
    client.close()
    path = lt.call(lambda: machine.server.path)
    nxt = qmp_kit.RawClient(path)
    try:
        assert b'"QMP"' in nxt.line()  # the next client is greeted
        machine.finish()               # the old reply has nobody to go to; its event goes to
        ev = json.loads(nxt.line())    # whoever is connected now, as every event does
        assert ev["event"] == "DEVICE_DELETED"
        assert nxt.ask(b'{"execute":"query-status"}') == EMPTY  # and no stray reply came with it
    finally:
        nxt.close()


def test_a_commands_events_leave_in_the_same_write_as_its_reply(slow):
    """hydropper reads one recv(1024) per command and keeps only the first non-event line of it:
    an event sent on its own, with the reply a moment later, would be taken for the reply. So
    the events a command causes go out with its reply, in one write, whether the reply is
    immediate or comes later."""
    machine, client, lt = slow
    assert client.buf == b""
    client.send(b'{"execute":"device_del","arguments":{"id":"d1"}}')
    assert machine.ready.wait(5)
    machine.finish()
    chunk = client.sock.recv(65536)   # one read gets both lines
    event, reply, rest = chunk.split(b"\n")
    assert json.loads(event)["event"] == "DEVICE_DELETED" and reply + b"\n" == EMPTY and rest == b""

    # An event emitted while a command executes, with its reply at once (quit's SHUTDOWN, cont's
    # RESUME), leaves together too; and an event with no command running goes out by itself.
    lt.call(lambda: setattr(machine, "execute", lambda request: machine.server.emit(DeviceDeletedEvent("x", "x"))))
    client.send(b'{"execute":"query-status"}')
    chunk = client.sock.recv(65536)
    assert chunk.count(b"\n") == 2 and chunk.endswith(EMPTY)
    lt.call(lambda: machine.server.emit(DeviceDeletedEvent("y", "y")))
    assert json.loads(client.sock.recv(65536))["data"]["device"] == "y"
