"""The devices after the replaceable slots -- balloon, rng, consoles -- without KVM: which windows
they get (pystratovirt.machine.mmio_devices, with a stand-in VM that records the eventfds it is
given), and what the machine refuses to build (pystratovirt.machine.microvm), with its sentences."""

from __future__ import annotations

import pytest

from pystratovirt.devices.bus import Bus
from pystratovirt.devices.chardev import ChardevConfig, FileChardev
from pystratovirt.machine import requests as rq
from pystratovirt.machine.microvm import _check_consoles
from pystratovirt.machine.mmio_devices import BALLOON_WINDOW, EXTRA_WINDOWS, WINDOW_COUNT, MmioDevices
from pystratovirt.machine.vmconfig import BalloonConfig, BootSource, ConsoleConfig, RngConfig, SerialConfig, VmConfig
from pystratovirt.memory.guest import GuestMemory
from pystratovirt.virtio.balloon import VirtioBalloon
from pystratovirt.virtio.console import VirtioConsole
from pystratovirt.virtio.rng import RngSource, VirtioRng


class RecordingVm:
    """Stands in for the KVM VM: records the ioeventfd and irqfd registrations."""

    def __init__(self):
        self.irqs: list[int] = []
        self.notify_addrs: set[int] = set()

    def ioeventfd(self, fd, addr, length, datamatch=None, deassign=False):
        self.notify_addrs.add(addr)

    def irqfd(self, fd, gsi, deassign=False):
        self.irqs.append(gsi)


@pytest.fixture
def mmio(tmp_path):
    mem = GuestMemory(128 << 20)
    vm = RecordingVm()
    devices = MmioDevices(vm, mem, Bus("mmio"))
    yield devices, vm, tmp_path
    devices.close()
    mem.close()


def test_balloon_first_then_rng_then_consoles(mmio):
    devices, vm, tmp = mmio
    balloon = VirtioBalloon(128 << 20)
    devices.add(BALLOON_WINDOW, balloon)
    rng = VirtioRng(RngSource("/dev/urandom"))
    devices.add_next(rng)
    console = VirtioConsole(FileChardev("log", str(tmp / "log")))
    devices.add_next(console)
    assert [(w.index, w.base, w.irq, w.device) for w in devices.windows] == [
        (8, 0xF0101000, 13, balloon), (9, 0xF0101200, 14, rng), (10, 0xF0101400, 15, console)]
    assert vm.irqs == [13, 14, 15]
    assert devices.cmdline() == ("virtio_mmio.device=512@0xf0101000:13 virtio_mmio.device=512@0xf0101200:14 "
                                 "virtio_mmio.device=512@0xf0101400:15")
    assert devices.acpi_resources()[1] == (0xF0101200, 512, 14)
    with pytest.raises(ValueError, match="no virtio-mmio window is left"):
        devices.add_next(VirtioBalloon(128 << 20))


def test_without_a_balloon_the_rng_takes_its_window(mmio):
    devices, _, _ = mmio
    devices.add_next(VirtioRng(RngSource("/dev/urandom")))
    assert [w.index for w in devices.windows] == [BALLOON_WINDOW]
    assert WINDOW_COUNT == 11 and EXTRA_WINDOWS == 3


def config(**kw) -> VmConfig:
    return VmConfig(boot=BootSource("/k"), **kw)


def refusal(cfg: VmConfig) -> str:
    with pytest.raises(rq.MachineError) as err:
        _check_consoles(cfg)
    return err.value.desc


def test_what_fits_is_accepted():
    _check_consoles(config(balloon=BalloonConfig(), rng=RngConfig("/dev/urandom"),
                           chardevs=[ChardevConfig("c", "socket", "/tmp/x.sock")],
                           consoles=[ConsoleConfig("con", "c")]))
    # Three consoles, each its own device (hvc0, hvc1, hvc2), on three chardevs.
    _check_consoles(config(chardevs=[ChardevConfig(i, "pty") for i in "abc"],
                           consoles=[ConsoleConfig(f"con{i}", i) for i in "abc"]))


def test_refusals():
    pty = [ChardevConfig("c", "pty")]
    assert refusal(config(chardevs=pty, consoles=[ConsoleConfig("con", "c", nr=2)])) == (
        "Console 'con' asks for port nr=2: only port 0 is supported (one console per virtio-console device, "
        "no multiport).")
    assert refusal(config(chardevs=pty, consoles=[ConsoleConfig("x", "c"), ConsoleConfig("y", "c")])) == (
        "Chardev 'c' is used by more than one console.")
    assert refusal(config(consoles=[ConsoleConfig("x", "missing")])) == (
        "Console 'x' names chardev 'missing', which is not defined.")
    stdio = [ChardevConfig("s", "stdio"), ChardevConfig("t", "stdio")]
    assert refusal(config(chardevs=stdio[:1], consoles=[ConsoleConfig("x", "s")],
                          serial=SerialConfig(stdio=True))) == (
        "Chardev 's' and -serial both want stdio; only one can have it.")
    assert refusal(config(chardevs=stdio, consoles=[ConsoleConfig("x", "s"), ConsoleConfig("y", "t")])) == (
        "Chardevs 's' and 't' both want stdio; only one can have it.")
    assert refusal(config(chardevs=stdio[:1], consoles=[ConsoleConfig("x", "s")], daemonize=True)) == (
        "Chardev 's' uses stdio, which a daemon does not have.")
    assert refusal(config(rng=RngConfig("/dev/urandom"), chardevs=[ChardevConfig(i, "pty") for i in "abc"],
                          consoles=[ConsoleConfig(f"con{i}", i) for i in "abc"])) == (
        "Too many devices: besides the disk and net slots the micro-VM has room for 3 (its virtio-mmio "
        "IRQs are 5-15), but 4 are configured (an rng, console 'cona', console 'conb', console 'conc').")
    assert refusal(config(chardevs=pty)) == (
        "Chardev 'c' is not used: only a virtconsole can use a chardev in this VMM.")
