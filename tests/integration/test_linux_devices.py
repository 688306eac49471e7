"""The slow tier for devices: the lean Linux kernel with a root disk, a NIC and a balloon,
booted once, observed through what the guest kernel itself reports.

On a host whose guest system calls fail (DEVELOPERS.md) Linux user space cannot run, so the
checks happen while the kernel is fully up but has not started init yet: ``rootdelay=`` keeps
it waiting before it mounts the root disk, with every driver probed and the network configured
by the kernel (``ip=``). In that window the test hot-plugs disks (the kernel reports the new
capacities), pings the kernel through the tap (it answers ICMP itself), replaces the NIC behind
eth0 and inflates the balloon (its driver gives pages back from kernel threads); then it pings
once more and ends the VM with ``quit``. The window is an upper bound for a busy machine, not a
wait: the root mount through vda and the guest's own reset are watched in the tiers that reach
them in minutes (test_linux_snapshot.py mounts root from vda, test_linux_lean.py resets).

The NIC hot-plugged into slot 0x1 (eth1) gets an address with no user space this way:
``netconsole=`` on the command line makes the kernel bring eth1 up at boot (its slot is empty,
the link down), and once a tap is plugged in and the link comes up, the kernel's IPv6 gives
eth1 a link-local address (SLAAC from its MAC) and answers ICMPv6 echo on it; netconsole also
sends every kernel message out of eth1 as UDP, traffic the guest itself originates.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from helpers.heldlinux import GUEST_IP, HOST_IP, held_linux_args, wait_held
from helpers.netns import NetNs
from helpers.vmproc import Qmp, VmProcess, vmm_rss

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

GiB = 1 << 30
MiB = 1 << 20
RAM = 4 * GiB
# Seconds the kernel waits before mounting root: the test's window. The guest's balloon driver
# moves about 10-17 MiB/s here (its ring-0 code is emulated), so 2 GiB out and back in takes
# 5-10 minutes; the window leaves room for a busy machine.
ROOT_DELAY = 900
BALLOON_TIMEOUT = 420
# eth1's netconsole: the kernel's log as UDP from GUEST_IP1:6665 to HOST_IP1:6666 (broadcast MAC).
GUEST_IP1 = "10.0.3.15"
HOST_IP1 = "10.0.3.1"
NETCONSOLE_PORT = 6666
BALLOON_PATH = "/machine/peripheral/balloon"
HOTPLUG_SIZES = {1: 16 * MiB, 2: 32 * MiB, 3: 48 * MiB}


def guest_stats(qmp: Qmp) -> dict:
    return qmp.execute("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})[1]["return"]


def link_local_peers(ns: NetNs, dev: str) -> set[str]:
    """The link-local addresses that answer an all-nodes ping on ``dev``, ours excluded."""
    own = set(re.findall(r"inet6 (fe80::[0-9a-f:]+)/", ns.ip("-6", "addr", "show", "dev", dev).stdout))
    out = ns.exec("ping", "-6", "-c", "3", "-W", "3", "-I", dev, "ff02::1", check=False).stdout
    return set(re.findall(r"from (fe80::[0-9a-f:]+)", out)) - own


def wait_balloon(qmp: Qmp, target: int, timeout: float) -> tuple[int, list[dict]]:
    """Poll query-balloon until it shows ``target``, then wait for the settled BALLOON_CHANGED:
    events are coalesced, so the one carrying the final value comes up to a second later."""
    deadline = time.monotonic() + timeout
    events = []
    while True:
        ev, reply = qmp.execute("query-balloon")
        events += ev
        actual = reply["return"]["actual"]
        if actual == target or time.monotonic() > deadline:
            break
        time.sleep(2)
    settle_deadline = time.monotonic() + 5
    while not any(e["event"] == "BALLOON_CHANGED" and e["data"]["actual"] == actual for e in events) \
            and time.monotonic() < settle_deadline:
        time.sleep(0.25)
        events += qmp.execute("query-balloon")[0]
    return actual, events


@pytest.fixture(scope="module")
def devices_boot(lean_guest, tmp_path_factory):
    from pystratovirt.guest.kit import write_rootfs
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this host")
    tmp = tmp_path_factory.mktemp("devices")
    rootfs = tmp / "rootfs.ext4"
    write_rootfs(rootfs, "64M")
    images = {}
    for slot, size in HOTPLUG_SIZES.items():
        images[slot] = tmp / f"disk{slot}.img"
        with open(images[slot], "wb") as f:
            f.truncate(size)
    ns = NetNs()
    obs: dict = {}
    sock = tmp / "vm.sock"
    log = tmp / "vmm.log"
    vm = None
    netconsole = None
    try:
        ns.add_tap("tap0")
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", "tap0")
        ns.add_tap("tap1")
        ns.add_tap("tap2")
        ns.ip("addr", "add", f"{HOST_IP1}/24", "dev", "tap2")
        ns.exec("sysctl", "-q", "-w", "net.ipv6.conf.tap2.disable_ipv6=0")
        with ns.entered():
            netconsole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        netconsole.bind((HOST_IP1, NETCONSOLE_PORT))
        netconsole.setblocking(False)
        netconsole_arg = f"netconsole=6665@{GUEST_IP1}/eth1,{NETCONSOLE_PORT}@{HOST_IP1}/"
        vm = VmProcess(held_linux_args(lean_guest, ram_mib=RAM // MiB, rootfs=rootfs,
                                       root_delay=ROOT_DELAY, sock=sock, log=log,
                                       extra_cmdline=netconsole_arg, extra_args=("-mem-prealloc",)),
                       prefix=["ip", "netns", "exec", ns.name])
        qmp = wait_held(vm, sock, ROOT_DELAY)

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

        # NIC hot-plugged into slot 0x1: the kernel reports eth1's link, gives it a link-local
        # address and answers ICMPv6 on it; netconsole sends the kernel's log out of it.
        obs["nic1_add"] = [qmp.execute("netdev_add", {"id": "nic-1", "ifname": "tap2"}),
                           qmp.execute("device_add", {"id": "nic-1", "driver": "virtio-net-mmio", "addr": "0x1"})]
        vm.wait_for(r"eth1: link becomes ready", 60, start=0)
        # Duplicate address detection runs on both ends before the addresses answer.
        deadline = time.monotonic() + 30
        while not (peers := link_local_peers(ns, "tap2")) and time.monotonic() < deadline:
            time.sleep(1)
        obs["nic1_peers"] = peers
        obs["nic1_ping"] = [ns.exec("ping", "-6", "-c", "10", "-i", "0.2", "-s", "1200", "-p", "5aa5c33c",
                                    "-W", "5", f"{peer}%tap2", check=False) for peer in sorted(peers)]
        # A kernel message after the hot-plug: it must come out of eth1 as UDP.
        obs["blk_del1"] = qmp.execute("device_del", {"id": "drive-1"})
        vm.wait_for(rf"vdb: detected capacity change from {HOTPLUG_SIZES[1] // 512} to 0", 120, start=0)
        received = b""
        deadline = time.monotonic() + 20
        while b"vdb: detected capacity change" not in received and time.monotonic() < deadline:
            try:
                received += netconsole.recv(65536)
            except BlockingIOError:
                time.sleep(0.1)
        obs["netconsole"] = received.decode(errors="replace")
        obs["nic1_del"] = qmp.execute("device_del", {"id": "nic-1"})
        time.sleep(1)
        obs["nic1_ping_after"] = [ns.exec("ping", "-6", "-c", "2", "-W", "2", f"{peer}%tap2", check=False)
                                  for peer in sorted(peers)]

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
        obs["stats_interval"] = qmp.execute("qom-set", {"path": BALLOON_PATH, "value": 2,
                                                        "property": "guest-stats-polling-interval"})
        time.sleep(5)
        obs["stats_before"] = guest_stats(qmp)
        obs["rss_before"] = vmm_rss(vm.pid)
        obs["balloon_set"] = qmp.execute("balloon", {"value": 2 * GiB})
        t0 = time.monotonic()
        obs["balloon_inflated"], ev1 = wait_balloon(qmp, 2 * GiB, BALLOON_TIMEOUT)
        obs["inflate_seconds"] = time.monotonic() - t0
        obs["rss_inflated"] = vmm_rss(vm.pid)
        time.sleep(6)  # at least two polling rounds: the driver answers from a kernel worker
        obs["stats_inflated"] = guest_stats(qmp)
        obs["balloon_reset"] = qmp.execute("balloon", {"value": RAM})
        t0 = time.monotonic()
        obs["balloon_deflated"], ev2 = wait_balloon(qmp, RAM, BALLOON_TIMEOUT)
        obs["deflate_seconds"] = time.monotonic() - t0
        obs["balloon_events"] = [e for e in ev1 + ev2 if e["event"] == "BALLOON_CHANGED"]

        # The kernel still answers after all of it, and was held the whole time.
        obs["ping_end"] = ns.exec("ping", "-c", "3", "-W", "5", GUEST_IP, check=False)
        obs["quit"] = qmp.execute("quit")
        obs["exit_code"] = vm.wait_exit(60)
        qmp.close()
    finally:
        if vm is not None:
            vm.kill()
            obs["serial"] = vm.serial()
        if netconsole is not None:
            netconsole.close()
        ns.close()
    obs["log"] = log.read_text() if log.exists() else ""
    print(f"\nballoon: 2 GiB inflated in {obs.get('inflate_seconds', -1):.0f} s, "
          f"deflated in {obs.get('deflate_seconds', -1):.0f} s; RSS {obs.get('rss_before', 0) // MiB} MiB -> "
          f"{obs.get('rss_inflated', 0) // MiB} MiB")
    return obs


def test_boot_disk_is_vda_with_its_size(devices_boot):
    assert re.search(r"\[vda\] 131072 512-byte logical blocks", devices_boot["serial"])
    for name in "bcdef":  # the empty slots are disks of capacity 0
        assert re.search(rf"\[vd{name}\] 0 512-byte logical blocks", devices_boot["serial"])


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


def test_nic_hot_plugged_into_slot_1_carries_traffic(devices_boot):
    assert all(reply == {"return": {}} for _, reply in devices_boot["nic1_add"])
    assert "eth1: link becomes ready" in devices_boot["serial"]
    assert len(devices_boot["nic1_peers"]) == 1, devices_boot["nic1_peers"]
    for ping in devices_boot["nic1_ping"]:
        assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
        assert "wrong data" not in ping.stdout
    # The guest kernel's own log, sent out of eth1 after the hot-plug.
    assert "vdb: detected capacity change from 32768 to 0" in devices_boot["netconsole"]
    events, reply = devices_boot["nic1_del"]
    assert reply == {"return": {}} and events[0]["data"] == {"device": "nic-1", "path": "nic-1"}
    assert all(p.returncode != 0 for p in devices_boot["nic1_ping_after"])


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


def test_balloon_guest_statistics_follow_the_balloon(devices_boot):
    """No `free` without user space: the guest's own figure comes from its balloon driver."""
    assert devices_boot["stats_interval"][1] == {"return": {}}
    before, inflated = devices_boot["stats_before"], devices_boot["stats_inflated"]
    assert before["last-update"] > 0 and inflated["last-update"] > before["last-update"]
    total = before["stats"]["stat-total-memory"]
    assert 3 * GiB < total <= RAM
    dropped = before["stats"]["stat-free-memory"] - inflated["stats"]["stat-free-memory"]
    assert 0.95 * 2 * GiB <= dropped <= 2.05 * GiB, f"free memory dropped by {dropped // MiB} MiB"


def test_the_kernel_answers_after_it_all_and_quit_ends_the_vmm(devices_boot):
    ping = devices_boot["ping_end"]
    assert ping.returncode == 0, ping.stdout
    # Held until the end: everything above happened before the kernel reached its root disk.
    assert "VFS: Mounted root" not in devices_boot["serial"]
    events, reply = devices_boot["quit"]
    assert reply == {"return": {}}
    assert [e["data"] for e in events if e["event"] == "SHUTDOWN"] == [{"guest": False, "reason": "host-qmp-quit"}]
    assert devices_boot["exit_code"] == 0
    assert "host-qmp-quit" in devices_boot["log"]
