"""stop does not block the control loop: the machine asks the vCPUs to park and answers when the
last one has, with STOP before the reply; cont releases them. Real threads stand in for vCPUs."""

from __future__ import annotations

import threading

import pytest

from pystratovirt.machine import microvm
from pystratovirt.machine import requests as rq
from pystratovirt.machine.microvm import MicroVm
from pystratovirt.machine.vcpu_thread import PauseGate
from pystratovirt.machine.vmconfig import BootSource, VmConfig
from pystratovirt.util.eventloop import EventLoop


class FakeVcpu:
    def __init__(self):
        self.kicked = threading.Event()

    def kick(self):
        self.kicked.set()


class Parker(threading.Thread):
    """A 'vCPU thread': parks when kicked, as VcpuThread does between KVM_RUNs."""

    def __init__(self, gate, vcpu, delay):
        super().__init__(daemon=True)
        self.gate, self.vcpu, self.delay = gate, vcpu, delay
        self.running = True

    def run(self):
        while self.running:
            if self.vcpu.kicked.wait(0.01):
                self.vcpu.kicked.clear()
                threading.Event().wait(self.delay)  # still busy in the guest for a moment
                if not self.gate.park():
                    return


class Events:
    def __init__(self):
        self.seen = []

    def emit(self, event):
        self.seen.append(event)


@pytest.fixture
def vm():
    loop = EventLoop()
    machine = MicroVm(VmConfig(boot=BootSource("/k")), loop)
    machine.events = Events()
    machine.vcpus = [FakeVcpu(), FakeVcpu()]
    machine._gate = PauseGate(2)
    parkers = [Parker(machine._gate, v, d) for v, d in zip(machine.vcpus, (0.05, 0.3), strict=True)]
    machine.threads = parkers
    machine.state = rq.RunState.RUNNING
    for p in parkers:
        p.start()
    yield machine
    machine._gate.stop()
    for p in parkers:
        p.running = False
        p.join(5)
    loop.close()


def run_until(loop, cond, timeout=5.0):
    deadline = loop.call_later(timeout, loop.stop)
    def check():
        if cond():
            deadline.cancel()
            loop.stop()
        else:
            loop.call_later(0.01, check)
    loop.call_soon_threadsafe(check)
    loop.run()


def test_stop_answers_once_every_vcpu_has_parked(vm):
    reply = vm.execute(rq.Stop())
    assert not reply.done() and vm.state is rq.RunState.RUNNING  # nobody blocked for it
    ticks = []
    vm.loop.call_later(0.01, lambda: ticks.append("loop ran meanwhile"))
    run_until(vm.loop, reply.done)
    assert reply.result() is None and ticks
    assert vm.state is rq.RunState.PAUSED and vm.events.seen == [rq.StopEvent()]
    assert vm._gate.parked == 2
    with pytest.raises(rq.MachineError, match="not running"):
        vm.execute(rq.Stop())
    vm.execute(rq.Cont())
    assert vm.state is rq.RunState.RUNNING and vm.events.seen[-1] == rq.ResumeEvent()


def test_a_second_stop_while_pausing_is_refused(vm):
    reply = vm.execute(rq.Stop())
    with pytest.raises(rq.MachineError, match="being paused"):
        vm.execute(rq.Stop())
    with pytest.raises(rq.MachineError, match="being paused"):
        vm.execute(rq.Cont())
    run_until(vm.loop, reply.done)


def test_vcpus_that_never_park_fail_the_stop_and_run_on(vm, monkeypatch):
    monkeypatch.setattr(microvm, "PAUSE_TIMEOUT", 0.1)
    for p in vm.threads:
        p.delay = 2.0  # far longer than the timeout
    reply = vm.execute(rq.Stop())
    run_until(vm.loop, reply.done)
    with pytest.raises(rq.MachineError, match="Failed to pause the vCPUs in time"):
        reply.result()
    assert vm.state is rq.RunState.RUNNING and not vm._gate.want_pause and vm.events.seen == []
