"""The slow ACPI tier: a Linux kernel that finds the machine through the VMM's ACPI tables only.

Debian's stock kernel finds virtio-mmio devices through ACPI, but its ``virtio_mmio`` driver is a
module, which only guest user space can load, and guest user space cannot run on this host
(DEVELOPERS.md). So this tier boots the guest kit's ``lean-acpi`` kernel: the lean kernel with
ACPI, without an MP table parser and without the ``virtio_mmio.device=`` parser, so its CPUs,
IOAPIC and every virtio device can only come from our RSDP/XSDT/MADT/DSDT, handled by the same
Linux ACPI and virtio-mmio code Debian's kernel runs. One boot, held before mounting root by
``rootdelay=``, serves every check: the boot disk, a disk hot-plug, ping, the balloon, QMP quit.
"""

from __future__ import annotations

import re
import time

import pytest

from helpers.guestlog import assert_acpi_tables_accepted
from helpers.heldlinux import GUEST_IP, HOST_IP, held_linux_args, wait_held
from helpers.netns import NetNs
from helpers.vmproc import VmProcess

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

MiB = 1 << 20
RAM = 512 * MiB
ROOT_DELAY = 600
HOTPLUG_SIZE = 16 * MiB
BALLOON_GIVE = 64 * MiB


@pytest.fixture(scope="module")
def acpi_boot(lean_acpi_guest, tmp_path_factory):
    from pystratovirt.guest.kit import write_rootfs
    tmp = tmp_path_factory.mktemp("acpi")
    rootfs = tmp / "rootfs.ext4"
    write_rootfs(rootfs, "64M")
    disk = tmp / "disk1.img"
    with open(disk, "wb") as f:
        f.truncate(HOTPLUG_SIZE)
    sock, log = tmp / "vm.sock", tmp / "vmm.log"
    ns = NetNs()
    obs: dict = {}
    vm = None
    try:
        ns.add_tap("tap0")
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", "tap0")
        vm = VmProcess(held_linux_args(lean_acpi_guest, ram_mib=RAM // MiB, rootfs=rootfs,
                                       root_delay=ROOT_DELAY, sock=sock, log=log),
                       prefix=["ip", "netns", "exec", ns.name])
        qmp = wait_held(vm, sock, ROOT_DELAY)
        obs["ready_seconds"] = time.monotonic() - vm.started

        obs["ping"] = ns.exec("ping", "-c", "3", "-W", "5", GUEST_IP, check=False)
        obs["blk_add"] = [
            qmp.execute("blockdev-add", {"node-name": "drive-1", "cache": {"direct": False},
                                         "file": {"driver": "file", "filename": str(disk)}}),
            qmp.execute("device_add", {"id": "drive-1", "driver": "virtio-blk-mmio", "addr": "0x1"})]
        vm.wait_for(rf"vdb: detected capacity change from 0 to {HOTPLUG_SIZE // 512}", 120, start=0)
        obs["blk_del"] = qmp.execute("device_del", {"id": "drive-1"})
        vm.wait_for(rf"vdb: detected capacity change from {HOTPLUG_SIZE // 512} to 0", 120, start=0)

        obs["balloon_set"] = qmp.execute("balloon", {"value": RAM - BALLOON_GIVE})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            obs["balloon_actual"] = qmp.execute("query-balloon")[1]["return"]["actual"]
            if obs["balloon_actual"] == RAM - BALLOON_GIVE:
                break
            time.sleep(1)

        obs["quit"] = qmp.execute("quit")
        obs["exit_code"] = vm.wait_exit(60)
        qmp.close()
    finally:
        if vm is not None:
            vm.kill()
            obs["serial"] = vm.serial()
        ns.close()
    obs["log"] = log.read_text() if log.exists() else ""
    print(f"\nlean-acpi kernel: process start to the rootdelay window in {obs.get('ready_seconds', -1):.1f} s")
    return obs


def test_the_kernel_can_only_use_acpi(lean_acpi_guest):
    config = lean_acpi_guest.config.read_text()
    assert "CONFIG_ACPI=y" in config and "pci=off" in lean_acpi_guest.cmdline
    assert "# CONFIG_X86_MPPARSE is not set" in config
    assert "# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set" in config


def test_acpi_tables_accepted(acpi_boot):
    assert_acpi_tables_accepted(acpi_boot["serial"], cpus=2)


def test_boot_disk_found_through_the_dsdt(acpi_boot):
    assert re.search(r"\[vda\] 131072 512-byte logical blocks", acpi_boot["serial"])


def test_disk_hot_plug_through_an_acpi_slot(acpi_boot):
    assert all(reply == {"return": {}} for _, reply in acpi_boot["blk_add"])
    events, reply = acpi_boot["blk_del"]
    assert reply == {"return": {}} and events[0]["event"] == "DEVICE_DELETED"


def test_nic_found_through_the_dsdt_answers_ping(acpi_boot):
    assert acpi_boot["ping"].returncode == 0, acpi_boot["ping"].stdout


def test_balloon_found_through_the_dsdt(acpi_boot):
    assert acpi_boot["balloon_set"][1] == {"return": {}}
    assert acpi_boot["balloon_actual"] == RAM - BALLOON_GIVE


def test_quit_ends_the_vmm(acpi_boot):
    events, reply = acpi_boot["quit"]
    assert reply == {"return": {}}
    assert acpi_boot["exit_code"] == 0
