"""Fixtures for the QMP tests: a real EventLoop on its own thread, a fake machine, a raw client.

The helper classes live here rather than in an importable module because the suite runs with
``--import-mode=importlib``, where a test module cannot import its neighbours; tests that build
their own set-up get the classes from the ``qmp_kit`` fixture.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from pystratovirt.machine.fds import Descriptors
from pystratovirt.machine.requests import (
    Balloon,
    BalloonChangedEvent,
    BalloonInfo,
    CloseFd,
    Cont,
    CpuInfo,
    CpuProps,
    DeviceDel,
    DeviceDeletedEvent,
    ErrorClass,
    GetFd,
    HotpluggableCpu,
    MachineError,
    QueryBalloon,
    QueryCpus,
    QueryHotpluggableCpus,
    QueryStatus,
    Quit,
    ResumeEvent,
    RunState,
    ShutdownEvent,
    ShutdownReason,
    StatusInfo,
    Stop,
    StopEvent,
)
from pystratovirt.qmp.server import QmpServer
from pystratovirt.util.eventloop import EventLoop


class FakeMachine:
    """A stand-in for the machine's Executor: keeps a run state and emits what the machine would.

    This is a fake for unit-testing the server; it boots nothing. Descriptors passed with getfd
    go to a real :class:`Descriptors` store, so tests can see what the server handed over.
    """

    def __init__(self) -> None:
        self.server: QmpServer | None = None
        self.state = RunState.RUNNING
        self.requests: list[object] = []
        self.memory = 4 << 30
        self.max_cpus = 2  # how many entries query-hotpluggable-cpus lists
        self.fds = Descriptors()
        self.on_quit = None  # a test's hook, run when quit starts

    def execute(self, request):
        self.requests.append(request)
        match request:
            case QueryStatus():
                return StatusInfo(self.state)
            case Stop() | Cont():
                want = RunState.RUNNING if isinstance(request, Stop) else RunState.PAUSED
                if self.state is not want:
                    raise MachineError("")  # StratoVirt's (empty) text for a redundant stop/cont
                paused = isinstance(request, Stop)
                self.state = RunState.PAUSED if paused else RunState.RUNNING
                self.server.emit(StopEvent() if paused else ResumeEvent())
                return None
            case Quit():
                if self.on_quit is not None:
                    self.on_quit()
                self.server.emit(ShutdownEvent(False, ShutdownReason.HOST_QMP_QUIT))
                return None
            case QueryCpus():
                return [CpuInfo(i, CpuProps(socket_id=i), f"/machine/unattached/device[{i}]",
                                8439 + i) for i in range(2)]
            case QueryHotpluggableCpus():
                return [HotpluggableCpu(CpuProps(socket_id=0), "/machine/unattached/device[0]")] + [
                    HotpluggableCpu(CpuProps(socket_id=i), None) for i in range(1, self.max_cpus)]
            case GetFd(fdname=name, fd=fd):
                self.fds.put(name, fd)
                return None
            case CloseFd(fdname=name):
                self.fds.close_named(name)
                return None
            case DeviceDel(id=dev):
                if dev == "missing":
                    raise MachineError(f"Device {dev} not found")
                self.server.emit(DeviceDeletedEvent(dev, dev))
                return None
            case Balloon(value=value):
                self.memory = value
                self.server.emit(BalloonChangedEvent(value))
                return None
            case QueryBalloon():
                if self.memory is None:
                    raise MachineError("No balloon device has been activated",
                                       ErrorClass.DEVICE_NOT_ACTIVE)
                return BalloonInfo(self.memory)
        return None


class LoopThread:
    """A real EventLoop running on a thread, with a way to run code on it and wait."""

    def __init__(self) -> None:
        self.loop = EventLoop()
        self.thread = threading.Thread(target=self.loop.run, name="qmp-test-loop", daemon=True)
        self.thread.start()

    def call(self, fn, timeout: float = 5.0):
        done: Future = Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as err:  # hand it to the test thread
                done.set_exception(err)
        self.loop.call_soon_threadsafe(run)
        return done.result(timeout)

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.loop.close()


class RawClient:
    """A blocking unix-socket client that reads whole lines."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: waits for room when the backlog is full
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"server hung up; unread: {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def ask(self, data: bytes | str) -> bytes:
        self.send(data)
        return self.line()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Harness:
    server: QmpServer
    machine: FakeMachine
    lt: LoopThread

    @property
    def path(self) -> str:
        return self.server.path


@pytest.fixture(scope="session")
def qmp_kit():
    """The harness classes: FakeMachine, LoopThread, RawClient."""
    return SimpleNamespace(FakeMachine=FakeMachine, LoopThread=LoopThread, RawClient=RawClient)


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
    machine.fds.close()


@pytest.fixture
def connect():
    """Open raw clients (``connect(path)``); any left open are closed afterwards."""
    clients = []

    def open_client(path: str) -> RawClient:
        clients.append(RawClient(path))
        return clients[-1]
    yield open_client
    for c in clients:
        c.close()


@pytest.fixture
def client(qmp):
    c = RawClient(qmp.path)
    yield c
    c.close()
