"""getfd/closefd and SCM_RIGHTS on the QMP socket: the server runs in this very process (on a
real EventLoop thread, fake machine with a real descriptor store), so /proc/self/fd shows every
descriptor it received, kept or closed."""

import array
import json
import os
import socket
import time

import pytest

from pystratovirt.machine.fds import open_descriptors
from pystratovirt.qmp.server import MAX_FDS, QmpServer

EMPTY = b'{"return":{}}\n'
STATUS = b'{"execute":"query-status"}'
RUNNING = b'{"return":{"running":true,"singlestep":false,"status":"running"}}\n'


def open_fds() -> set[int]:
    return set(open_descriptors(0))  # leaves out the listing's own directory descriptor


def send_with_fds(client, data: bytes, fds: list[int]) -> None:
    client.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


@pytest.fixture
def greeted(client):
    client.line()
    return client


def test_getfd_takes_the_descriptor_sent_with_it(greeted, qmp, pipe):
    # govmm's ExecuteGetFD: the command and the descriptor in one sendmsg.
    send_with_fds(greeted, b'{"arguments":{"fdname":"fd0"},"execute":"getfd"}\n', [pipe[0]])
    assert greeted.line() == EMPTY
    assert qmp.machine.fds.names == ["fd0"]
    held = qmp.lt.call(lambda: qmp.machine.fds.take("fd0"))
    assert held != pipe[0] and same_file(held, pipe[0])
    assert os.get_inheritable(held) is False  # received with MSG_CMSG_CLOEXEC
    os.close(held)


def test_qemu_qmp_send_fd_scm_then_getfd(qmp, pipe):
    # qemu.qmp sends the descriptor with a lone space, then getfd as a separate message.
    from qemu.qmp import ExecuteError
    from qemu.qmp.legacy import QEMUMonitorProtocol
    monitor = QEMUMonitorProtocol(qmp.path)
    try:
        monitor.connect()
        monitor.send_fd_scm(pipe[1])
        assert monitor.cmd("getfd", fdname="fd-w") == {}
        assert monitor.cmd("closefd", fdname="fd-w") == {}
        with pytest.raises(ExecuteError):
            monitor.cmd("closefd", fdname="fd-w")
    finally:
        monitor.close()
    assert qmp.machine.fds.names == []


def test_getfd_errors(greeted, qmp):
    assert greeted.ask(b'{"execute":"getfd","arguments":{"fdname":"fd0"},"id":3}') == \
        b'{"error":{"class":"GenericError","desc":"No file descriptor supplied via SCM_RIGHTS"},' \
        b'"id":3}\n'
    assert greeted.ask(b'{"execute":"closefd","arguments":{"fdname":"fd0"}}') == \
        b'{"error":{"class":"GenericError","desc":"File descriptor named \'fd0\' not found"}}\n'
    assert json.loads(greeted.ask(b'{"execute":"getfd","arguments":{"fdname":"0x"}}')) == \
        {"error": {"class": "GenericError",
                   "desc": "Parameter 'fdname' expects a name not starting with a digit"}}
    assert json.loads(greeted.ask(b'{"execute":"getfd"}'))["error"]["desc"] == \
        "Parameter 'fdname' is missing"


def test_getfd_with_a_name_in_use_replaces_and_closes_the_old_one(greeted, qmp, pipe):
    send_with_fds(greeted, b'{"execute":"getfd","arguments":{"fdname":"x"}}', [pipe[0]])
    assert greeted.line() == EMPTY
    first = qmp.machine.fds._named["x"]
    send_with_fds(greeted, b'{"execute":"getfd","arguments":{"fdname":"x"}}', [pipe[1]])
    assert greeted.line() == EMPTY
    second = qmp.machine.fds._named["x"]
    assert same_file(second, pipe[1])
    assert first not in open_fds() or not same_file(first, pipe[0])  # closed (or reused)


def test_descriptors_sent_with_any_other_command_are_closed_at_once(greeted, pipe):
    baseline = open_fds()
    for message in (STATUS, b'{"execute":"closefd","arguments":{"fdname":"nope"}}',
                    b'{"execute": broken json}', b'[1,2]', b'"just a string"',
                    b'{"execute":"getfd","arguments":{"fdname":"9bad"}}',
                    b'{"execute":"no-such-command"}'):
        send_with_fds(greeted, message, [pipe[0], pipe[1], pipe[0]])
        greeted.line()
        assert open_fds() == baseline, message
    assert greeted.ask(STATUS) == RUNNING


def test_getfd_keeps_one_and_closes_the_extras(greeted, qmp, pipe):
    baseline = open_fds()
    send_with_fds(greeted, b'{"execute":"getfd","arguments":{"fdname":"many"}}',
                  [pipe[1]] + [pipe[0]] * 5)
    assert greeted.line() == EMPTY
    assert open_fds() - baseline == {qmp.machine.fds._named["many"]}
    assert same_file(qmp.machine.fds._named["many"], pipe[1])


def test_more_descriptors_than_one_message_may_carry(greeted, qmp, pipe, caplog):
    baseline = open_fds()
    send_with_fds(greeted, b'{"execute":"getfd","arguments":{"fdname":"flood"}}',
                  [pipe[0]] * (MAX_FDS + 40))
    assert greeted.line() == EMPTY
    assert len(open_fds() - baseline) == 1  # the kernel closed what did not fit; we the rest
    assert "more than 16 file descriptors" in caplog.text


def test_descriptors_with_a_message_split_over_two_writes(greeted, qmp, pipe):
    message = b'{"execute":"getfd","arguments":{"fdname":"split"}}'
    send_with_fds(greeted, message[:20], [pipe[0]])
    time.sleep(0.05)  # the server reads the first part (and the descriptor) on its own
    greeted.send(message[20:])
    assert greeted.line() == EMPTY
    assert same_file(qmp.machine.fds._named["split"], pipe[0])


def test_pipelined_commands_the_descriptor_goes_to_the_one_it_came_with(greeted, qmp, pipe):
    greeted.send(STATUS)
    send_with_fds(greeted, b'{"execute":"getfd","arguments":{"fdname":"late"}}', [pipe[0]])
    assert greeted.line() == RUNNING
    assert greeted.line() == EMPTY
    assert qmp.machine.fds.names == ["late"]


def test_a_lone_space_after_pipelined_commands_waits_for_the_next_one(greeted, qmp, pipe):
    # The kernel glues the earlier, descriptor-less write in front of the lone space: the
    # descriptor still goes to the getfd that follows, not to query-status.
    greeted.send(STATUS + b"\n" + STATUS)
    send_with_fds(greeted, b" ", [pipe[0]])
    time.sleep(0.05)
    assert greeted.line() == RUNNING and greeted.line() == RUNNING
    assert greeted.ask(b'{"execute":"getfd","arguments":{"fdname":"alone"}}') == EMPTY
    assert same_file(qmp.machine.fds._named["alone"], pipe[0])


def test_a_newer_waiting_batch_replaces_an_older_one(greeted, qmp, pipe):
    baseline = open_fds()
    send_with_fds(greeted, b" ", [pipe[0]])
    time.sleep(0.05)
    send_with_fds(greeted, b"\n", [pipe[1]])
    time.sleep(0.05)
    assert greeted.ask(b'{"execute":"getfd","arguments":{"fdname":"w"}}') == EMPTY
    assert same_file(qmp.machine.fds._named["w"], pipe[1])
    assert open_fds() - baseline == {qmp.machine.fds._named["w"]}


def test_a_client_that_leaves_takes_its_descriptors_with_it(qmp, connect, pipe):
    baseline = open_fds()
    c = connect(qmp.path)
    c.line()
    send_with_fds(c, b"  ", [pipe[0], pipe[1]])  # waiting for a command that never comes
    send_with_fds(c, b'{"execute":"getfd","arguments"', [pipe[0]])  # and a message never ended
    time.sleep(0.05)
    c.close()
    deadline = time.monotonic() + 5
    while qmp.lt.call(lambda: qmp.server.connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    qmp.lt.call(lambda: None)
    assert open_fds() == baseline


def test_getfd_before_the_machine_exists_closes_the_descriptor(tmp_path, loop_thread, connect,
                                                               pipe):
    server = QmpServer(loop_thread.loop, tmp_path / "s.sock", None)
    loop_thread.call(server.start)
    c = connect(server.path)
    c.line()
    baseline = open_fds()
    send_with_fds(c, b'{"execute":"getfd","arguments":{"fdname":"x"}}', [pipe[0]])
    assert c.line() == \
        b'{"error":{"class":"GenericError","desc":"The virtual machine is not ready"}}\n'
    assert open_fds() == baseline
    c.close()
    loop_thread.call(server.close)
