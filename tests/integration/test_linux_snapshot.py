"""The slow snapshot tier: the lean Linux kernel, held before it mounts root (as the device tier
holds it, tests/helpers/heldlinux.py), is saved with ``stop`` + ``migrate``, its VMM ends, and a
new VMM started with ``-incoming`` carries the same kernel on: it answers ICMP on eth0, reports a
disk hot-plugged after the restore, keeps its timers (the ``rootdelay=`` wait it was in ends on
time by the guest's clock, and it mounts the root disk), and never boots again.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from helpers.heldlinux import GUEST_IP, HOST_IP, ext4_mount_count, held_linux_args, wait_held
from helpers.netns import NetNs
from helpers.vmproc import Qmp, VmProcess

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

MiB = 1 << 20
RAM_MIB = 512
# The window the kernel waits before mounting root; the snapshot is taken at its start and the
# restored kernel must finish it (its timers tick) and mount the root disk.
ROOT_DELAY = 180
HOTPLUG = 16 * MiB
STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]", re.M)


def stamps(text: str) -> list[float]:
    return [float(s) for s in STAMP.findall(text)]


def stamp_of(text: str, pattern: str) -> float:
    m = re.search(rf"^\[\s*(\d+\.\d+)\] (?:{pattern})", text, re.M)
    assert m, f"no {pattern!r} in the guest's log"
    return float(m.group(1))


@pytest.fixture(scope="module")
def linux_snapshot(lean_guest, tmp_path_factory):
    from pystratovirt.guest.kit import write_rootfs
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this host")
    tmp = tmp_path_factory.mktemp("linux-snapshot")
    rootfs = tmp / "rootfs.ext4"
    write_rootfs(rootfs, "64M")
    mounts_before = ext4_mount_count(rootfs)
    disk = tmp / "disk1.img"
    with open(disk, "wb") as f:
        f.truncate(HOTPLUG)
    snap, sock = tmp / "snap", tmp / "vm.sock"
    ns = NetNs()
    prefix = ["ip", "netns", "exec", ns.name]
    obs: dict = {"mounts_before": mounts_before}
    first = second = None
    try:
        ns.add_tap("tap0")
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", "tap0")

        def args(log):
            return held_linux_args(lean_guest, ram_mib=RAM_MIB, rootfs=rootfs, root_delay=ROOT_DELAY,
                                   sock=sock, log=log)

        first = VmProcess(args(tmp / "first.log"), prefix=prefix)
        with wait_held(first, sock, ROOT_DELAY) as qmp:
            obs["ping_before"] = ns.exec("ping", "-c", "2", "-W", "5", GUEST_IP, check=False)
            obs["stop"] = qmp.execute("stop")
            obs["migrate"] = qmp.execute("migrate", {"uri": f"file:{snap}"})
            obs["query_migrate"] = qmp.execute("query-migrate")[1]
            qmp.execute("quit")
        obs["first_exit"] = first.wait_exit(60)
        obs["first_serial"] = first.serial()
        if sock.exists():
            sock.unlink()

        started = time.monotonic()
        second = VmProcess(args(tmp / "second.log") + ["-incoming", f"file:{snap}"], prefix=prefix)
        with Qmp(sock, timeout=60) as qmp:
            obs["status"] = qmp.execute("query-status")[1]
            obs["qmp_seconds"] = time.monotonic() - started
            # The kernel answers ICMP on eth0 by itself: no user space needed.
            obs["ping_after"] = ns.exec("ping", "-c", "3", "-W", "5", GUEST_IP, check=False)
            obs["ping_seconds"] = time.monotonic() - started
            obs["hotplug"] = [qmp.execute("blockdev-add", {"node-name": "drive-1", "cache": {"direct": False},
                                                           "file": {"driver": "file", "filename": str(disk)}}),
                              qmp.execute("device_add", {"id": "drive-1", "driver": "virtio-blk-mmio",
                                                         "addr": "0x1"})]
            second.wait_for(rf"vdb: detected capacity change from 0 to {HOTPLUG // 512}", 120, start=0)
            # The rootdelay wait the kernel was in when it was saved runs out by its own clock.
            second.wait_for(r"VFS: Mounted root \(ext4 filesystem\)", ROOT_DELAY + 300, start=0)
        obs["second_exit"] = second.wait_exit(300)   # init cannot run here: the guest resets
    finally:
        for vm in (first, second):
            if vm is not None:
                vm.kill()
        if second is not None:
            obs["second_serial"] = second.serial()
            obs["second_log"] = (tmp / "second.log").read_text() if (tmp / "second.log").exists() else ""
        ns.close()
    obs["mounts_after"] = ext4_mount_count(rootfs)
    print(f"\nrestored Linux guest: QMP answered {obs.get('qmp_seconds', -1):.2f} s and eth0 answered ping "
          f"{obs.get('ping_seconds', -1):.2f} s after the VMM started")
    return obs


def test_the_snapshot_is_taken_while_the_kernel_is_held(linux_snapshot):
    assert linux_snapshot["ping_before"].returncode == 0
    assert linux_snapshot["migrate"][1] == {"return": {}}
    info = linux_snapshot["query_migrate"]["return"]
    assert info["status"] == "completed" and info["ram"]["total"] == RAM_MIB * MiB
    assert linux_snapshot["first_exit"] == 0


def test_the_restored_kernel_does_not_boot_again(linux_snapshot):
    serial = linux_snapshot["second_serial"]
    assert linux_snapshot["status"] == {"return": {"running": True, "singlestep": False, "status": "running"}}
    assert "Linux version" not in serial and "Command line:" not in serial
    assert f"Waiting {ROOT_DELAY} sec before mounting root" not in serial


def test_the_restored_kernel_answers_ping_on_eth0(linux_snapshot):
    ping = linux_snapshot["ping_after"]
    assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout


def test_a_disk_hot_plugged_after_restore_shows_up(linux_snapshot):
    assert all(reply == {"return": {}} for _, reply in linux_snapshot["hotplug"])
    assert f"vdb: detected capacity change from 0 to {HOTPLUG // 512}" in linux_snapshot["second_serial"]


def test_the_kernels_timers_carry_on(linux_snapshot):
    first, second = linux_snapshot["first_serial"], linux_snapshot["second_serial"]
    waiting = stamp_of(first, f"Waiting {ROOT_DELAY} sec before mounting root")
    last_before = max(stamps(first))
    after = stamps(second)
    assert after and min(after) >= last_before          # new lines, later timestamps
    hotplug = stamp_of(second, r"vdb: detected capacity change")
    mounted = stamp_of(second, r"EXT4-fs \(vda\): mounted filesystem|VFS: Mounted root")
    assert last_before < hotplug < mounted
    # The wait ended when the guest's clock said so: the time the VMMs were switching (the
    # kvmclock was restored as saved) does not count.
    assert waiting + ROOT_DELAY <= mounted < waiting + ROOT_DELAY + 30, (waiting, mounted)


def test_the_guest_reset_ends_the_restored_vmm(linux_snapshot):
    assert linux_snapshot["second_exit"] == 0
    assert "guest-reset" in linux_snapshot["second_log"]


def test_the_restored_kernel_mounts_root_through_our_device(linux_snapshot):
    assert re.search(r"EXT4-fs \(vda\): mounted filesystem", linux_snapshot["second_serial"])
    # The kernel wrote the superblock back (mount count) through virtio-blk, once: the first
    # VMM's kernel never got that far.
    assert linux_snapshot["mounts_after"] == linux_snapshot["mounts_before"] + 1
