"""The machine's request handlers (pystratovirt.machine.microvm) without KVM: which requests it
answers, and the refusals that need no running guest, on a MicroVm that was never built."""

from __future__ import annotations

import typing

import pytest

from pystratovirt.machine import requests as rq
from pystratovirt.machine.microvm import _HANDLERS, MicroVm
from pystratovirt.machine.vmconfig import BootSource, MachineConfig, VmConfig
from pystratovirt.util.eventloop import EventLoop
from pystratovirt.virtio.balloon import VirtioBalloon

MiB = 1 << 20
# Answered by the QMP server itself (protocol-level), never by the machine.
SERVER_ONLY = {rq.QmpCapabilities, rq.QueryVersion, rq.QueryCommands}


@pytest.fixture
def vm():
    loop = EventLoop()
    machine = MicroVm(VmConfig(boot=BootSource("/k"), machine=MachineConfig(mem_size=512 * MiB)), loop)
    yield machine
    loop.close()


def refusal(vm, request) -> rq.MachineError:
    with pytest.raises(rq.MachineError) as info:
        vm.execute(request)
    return info.value


def test_every_machine_request_has_a_handler():
    vocabulary = set(typing.get_args(rq.Request))
    assert vocabulary - SERVER_ONLY == set(_HANDLERS)


def test_query_balloon_answers_the_configured_ram_before_the_driver_is_up(vm):
    err = refusal(vm, rq.QueryBalloon())  # no balloon device at all
    assert (err.error_class, err.desc) == (rq.ErrorClass.DEVICE_NOT_ACTIVE, "No balloon device has been activated")
    vm.balloon = VirtioBalloon(512 * MiB)
    assert vm.execute(rq.QueryBalloon()) == rq.BalloonInfo(actual=512 * MiB)  # StratoVirt: the device exists
    # Setting a target needs the guest's driver.
    err = refusal(vm, rq.Balloon(value=256 * MiB))
    assert (err.error_class, err.desc) == (rq.ErrorClass.DEVICE_NOT_ACTIVE, "No balloon device has been activated")


def test_qom_paths_properties_and_values(vm):
    assert refusal(vm, rq.QomGet("/machine/peripheral/balloon", "guest-stats")).error_class is \
        rq.ErrorClass.DEVICE_NOT_FOUND  # no balloon yet
    vm.balloon = VirtioBalloon(512 * MiB)
    path = rq.BALLOON_QOM_PATH
    assert vm.execute(rq.QomGet(path, "guest-stats")) == rq.BalloonGuestStats(last_update=0, values={})
    assert vm.execute(rq.QomGet(path, "guest-stats-polling-interval")) == 0
    vm.execute(rq.QomSet(path, "guest-stats-polling-interval", 5))
    assert vm.execute(rq.QomGet(path, "guest-stats-polling-interval")) == 5
    for value, text in [("5", "Invalid parameter type for 'value', expected: integer"),
                        (True, "Invalid parameter type for 'value', expected: integer"),
                        (-1, "timer value must be greater than zero"),
                        (1 << 32, "timer value is too big")]:
        assert refusal(vm, rq.QomSet(path, "guest-stats-polling-interval", value)).desc == text
    assert refusal(vm, rq.QomSet(path, "guest-stats", 1)).desc == \
        "Property 'virtio-balloon-device.guest-stats' is not writable"
    assert refusal(vm, rq.QomGet(path, "nope")).desc == "Property 'virtio-balloon-device.nope' not found"
    assert refusal(vm, rq.QomGet("/machine/other", "guest-stats")).desc == "Device '/machine/other' not found"


def test_stop_and_cont_refuse_the_wrong_state(vm):
    vm.state = rq.RunState.PAUSED
    assert refusal(vm, rq.Stop()).desc == "The VM is not running (it is paused)."
    vm.state = rq.RunState.RUNNING
    assert refusal(vm, rq.Cont()).desc == "The VM is not paused (it is running)."


def test_query_status_is_the_state(vm):
    vm.state = rq.RunState.PAUSED
    assert vm.execute(rq.QueryStatus()) == rq.StatusInfo(rq.RunState.PAUSED)
    assert not vm.execute(rq.QueryStatus()).running
