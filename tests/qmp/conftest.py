"""Fixtures for the QMP tests (helpers live in qmp_harness.py)."""

import pytest
from qmp_harness import FakeMachine, Harness, LoopThread, RawClient

from pystratovirt.qmp.server import QmpServer


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def qmp(tmp_path, loop_thread):
    """A started server at tmp_path/qmp.sock backed by a FakeMachine; closed afterwards."""
    machine = FakeMachine()
    server = QmpServer(loop_thread.loop, tmp_path / "qmp.sock", machine)
    machine.server = server
    loop_thread.call(server.start)
    yield Harness(server, machine, loop_thread)
    loop_thread.call(server.close)


@pytest.fixture
def client(qmp):
    c = RawClient(qmp.path)
    yield c
    c.close()
