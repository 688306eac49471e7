"""The slow tier for devices: the lean Linux kernel with a root disk, a NIC and a balloon,
booted once, observed through what the guest kernel itself reports.

On a host whose guest system calls fail (DEVELOPERS.md) Linux user space cannot run, so the
checks happen while the kernel is fully up but has not started init yet: ``rootdelay=`` keeps
it waiting before it mounts the root disk, with every driver probed and the network configured
by the kernel (``ip=``). In that window the test hot-plugs disks (the kernel reports the new
capacities), pings the kernel through the tap (it answers ICMP itself), replaces the NIC behind
eth0 and inflates the balloon (its driver gives pages back from kernel threads). Then the
kernel mounts the ext4 root disk from vda, runs init, and the guest's own reset ends the VMM.
"""

from __future__ import annotations

import os
import re
import struct
import time

import pytest

from helpers.netns import NetNs
from helpers.vmproc import Qmp, VmProcess, wait_for_path

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

GiB = 1 << 30
MiB = 1 << 20
RAM = 4 * GiB
# Seconds the kernel waits before mounting root: the test's window. The guest's balloon driver
# moves about 10-17 MiB/s here (its ring-0 code is emulated), so 2 GiB out and back in takes
# 5-10 minutes; the window leaves room for a busy machine.
ROOT_DELAY = 900
BALLOON_TIMEOUT = 420
GUEST_IP = "10.0.2.15"     # inside the test's own network namespace only
HOST_IP = "10.0.2.1"
HOTPLUG_SIZES = {1: 16 * MiB, 2: 32 * MiB, 3: 48 * MiB}


def vmm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss")


def ext4_mount_count(path) -> int:
    with open(path, "rb") as f:
        f.seek(1024 + 0x34)
        return struct.unpack("<H", f.read(2))[0]


def wait_balloon(qmp: Qmp, target: int, timeout: float) -> tuple[int, list[dict]]:
    deadline = time.monotonic() + timeout
    events = []
    while True:
        ev, reply = qmp.execute("query-balloon")
        events += ev
        actual = reply["return"]["actual"]
        if actual == target or time.monotonic() > deadline:
            return actual, events
        time.sleep(2)


@pytest.fixture(scope="module")
def devices_boot(lean_guest, tmp_path_factory):
    from pystratovirt.guest.kit import write_rootfs
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this host")
    tmp = tmp_path_factory.mktemp("devices")
    rootfs = tmp / "rootfs.ext4"
    write_rootfs(rootfs, "64M")
    mounts_before = ext4_mount_count(rootfs)
    images = {}
    for slot, size in HOTPLUG_SIZES.items():
        images[slot] = tmp / f"disk{slot}.img"
        with open(images[slot], "wb") as f:
            f.truncate(size)
    ns = NetNs()
    obs: dict = {"mounts_before": mounts_before}
    sock = tmp / "vm.sock"
    log = tmp / "vmm.log"
    vm = None
    try:
        ns.add_tap("tap0")
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", "tap0")
        ns.add_tap("tap1")
        cmdline = (f"{lean_guest.cmdline} root=/dev/vda rw rootdelay={ROOT_DELAY} "
                   f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off")
        vm = VmProcess(["-kernel", str(lean_guest.bzimage), "-append", cmdline, "-smp", "2",
                        "-m", f"{RAM // MiB}M", "-mem-prealloc",
                        "-drive", f"file={rootfs},id=rootfs,direct=off",
                        "-netdev", "id=net0,netdev=tap0", "-balloon", "deflate-on-oom=true",
                        "-serial", "stdio", "-api-channel", f"unix:{sock}", "-D", str(log)],
                       prefix=["ip", "netns", "exec", ns.name])
        wait_for_path(sock, 120)
        qmp = Qmp(sock)
        vm.wait_for(rf"Waiting {ROOT_DELAY} sec before mounting root", 900)

        # Network: the guest kernel answers ICMP on eth0, configured by ip=.
        obs["ping"] = ns.exec("ping", "-c", "3", "-W", "5", GUEST_IP, check=False)
        # A burst of large pings with a payload pattern ping checks on every echo.
        obs["burst"] = ns.exec("ping", "-c", "30", "-i", "0.2", "-s", "1400", "-p", "a55a0ff0c33c",
                               "-W", "5", GUEST_IP, check=False)

        # Disks: hot-plug three, then unplug one.
        obs["blk_add"] = []
        for slot, path in images.items():
            obs["blk_add"].append(qmp.execute("blockdev-add", {
                "node-name": f"drive-{slot}", "file": {"driver": "file", "filename": str(path)},
                "cache": {"direct": False}, "read-only": False}))
            obs["blk_add"].append(qmp.execute("device_add", {
                "id": f"drive-{slot}", "driver": "virtio-blk-mmio", "addr": hex(slot)}))
        for slot, size in HOTPLUG_SIZES.items():
            name = "vd" + "abcdef"[slot]
            vm.wait_for(rf"{name}: detected capacity change from 0 to {size // 512}", 120, start=0)
        obs["blk_del"] = qmp.execute("device_del", {"id": "drive-2"})
        vm.wait_for(rf"vdc: detected capacity change from {HOTPLUG_SIZES[2] // 512} to 0", 120, start=0)

        # NIC: unplug the tap behind eth0, plug another one into the same slot, ping through it.
        obs["net_del"] = qmp.execute("device_del", {"id": "net0"})
        obs["ping_unplugged"] = ns.exec("ping", "-c", "2", "-W", "2", GUEST_IP, check=False)
        ns.ip("addr", "del", f"{HOST_IP}/24", "dev", "tap0")
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", "tap1")
        obs["net_add"] = [qmp.execute("netdev_add", {"id": "net-1", "ifname": "tap1"}),
                          qmp.execute("device_add", {"id": "net-1", "driver": "virtio-net-mmio", "addr": "0x0"})]
        time.sleep(2)
        obs["ping_replugged"] = ns.exec("ping", "-c", "5", "-W", "5", GUEST_IP, check=False)

        # Balloon: the seed's example, 4 GiB down to 2 GiB and back.
        obs["balloon_start"] = qmp.execute("query-balloon")[1]
        obs["rss_before"] = vmm_rss(vm.pid)
        obs["balloon_set"] = qmp.execute("balloon", {"value": 2 * GiB})
        t0 = time.monotonic()
        obs["balloon_inflated"], ev1 = wait_balloon(qmp, 2 * GiB, BALLOON_TIMEOUT)
        obs["inflate_seconds"] = time.monotonic() - t0
        obs["rss_inflated"] = vmm_rss(vm.pid)
        obs["balloon_reset"] = qmp.execute("balloon", {"value": RAM})
        t0 = time.monotonic()
        obs["balloon_deflated"], ev2 = wait_balloon(qmp, RAM, BALLOON_TIMEOUT)
        obs["deflate_seconds"] = time.monotonic() - t0
        obs["balloon_events"] = [e for e in ev1 + ev2 if e["event"] == "BALLOON_CHANGED"]

        # Then the kernel mounts the root disk, runs init, and (here) resets itself.
        vm.wait_for(r"VFS: Mounted root \(ext4 filesystem\)", ROOT_DELAY + 300, start=0)
        obs["exit_code"] = vm.wait_exit(300)
        qmp.close()
    finally:
        if vm is not None:
            vm.kill()
            obs["serial"] = vm.serial()
        ns.close()
    obs["log"] = log.read_text() if log.exists() else ""
    obs["mounts_after"] = ext4_mount_count(rootfs)
    print(f"\nballoon: 2 GiB inflated in {obs.get('inflate_seconds', -1):.0f} s, "
          f"deflated in {obs.get('deflate_seconds', -1):.0f} s; RSS {obs.get('rss_before', 0) // MiB} MiB -> "
          f"{obs.get('rss_inflated', 0) // MiB} MiB")
    return obs


def test_boot_disk_is_vda_with_its_size(devices_boot):
    assert re.search(r"\[vda\] 131072 512-byte logical blocks", devices_boot["serial"])
    for name in "bcdef":  # the empty slots are disks of capacity 0
        assert re.search(rf"\[vd{name}\] 0 512-byte logical blocks", devices_boot["serial"])


def test_root_disk_mounted_through_our_device(devices_boot):
    serial = devices_boot["serial"]
    assert re.search(r"EXT4-fs \(vda\): mounted filesystem", serial)
    # The kernel wrote the superblock back (mount count) through virtio-blk.
    assert devices_boot["mounts_after"] == devices_boot["mounts_before"] + 1


def test_disk_hot_plug_and_unplug(devices_boot):
    assert all(reply == {"return": {}} for _, reply in devices_boot["blk_add"])
    events, reply = devices_boot["blk_del"]
    assert reply == {"return": {}}
    assert [(e["event"], e["data"]) for e in events] == [("DEVICE_DELETED", {"device": "drive-2", "path": "drive-2"})]
    serial = devices_boot["serial"]
    assert "vdb: detected capacity change from 0 to 32768" in serial
    assert "vdd: detected capacity change from 0 to 98304" in serial


def test_kernel_answers_ping_over_the_tap(devices_boot):
    assert devices_boot["ping"].returncode == 0, devices_boot["ping"].stdout
    burst = devices_boot["burst"]
    assert burst.returncode == 0, burst.stdout
    assert " 0% packet loss" in burst.stdout
    assert "wrong data" not in burst.stdout and "corrupted" not in burst.stdout.lower()


def test_nic_unplug_and_hot_plug(devices_boot):
    events, reply = devices_boot["net_del"]
    assert reply == {"return": {}} and events[0]["data"] == {"device": "net0", "path": "net0"}
    assert devices_boot["ping_unplugged"].returncode != 0
    assert all(reply == {"return": {}} for _, reply in devices_boot["net_add"])
    assert devices_boot["ping_replugged"].returncode == 0, devices_boot["ping_replugged"].stdout


def test_balloon_seed_example(devices_boot):
    assert devices_boot["balloon_start"] == {"return": {"actual": RAM}}
    assert devices_boot["balloon_set"][1] == {"return": {}}
    assert devices_boot["balloon_inflated"] == 2 * GiB
    assert devices_boot["balloon_deflated"] == RAM
    released = devices_boot["rss_before"] - devices_boot["rss_inflated"]
    assert released >= 0.9 * 2 * GiB, f"RSS dropped by {released // MiB} MiB"
    actuals = [e["data"]["actual"] for e in devices_boot["balloon_events"]]
    assert 2 * GiB in actuals and actuals[-1] == RAM


def test_guest_reset_ends_the_vmm(devices_boot):
    assert devices_boot["exit_code"] == 0
    assert "guest-reset" in devices_boot["log"]
