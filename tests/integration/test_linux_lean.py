"""The slow tier: the lean Linux kernel (built by the guest kit) booted once, many checks.

One boot serves every check here. While the kernel boots, QMP queries its vCPUs and pauses and
resumes it; the serial log then shows what the guest kernel found (version, CPUs, memory, the
initramfs). Where guest user space works, the shell answers ``uname -r`` and reboots; on a host
whose guest system calls fail (DEVELOPERS.md), init dies, the kernel panics and, with
``panic=1``, reboots itself. Either way the guest's own reset must end the VMM with a
SHUTDOWN(guest) event and exit code 0.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from helpers.vmproc import Qmp, VmProcess, wait_for_path

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

MEM_MIB = 512
BOOT_TIMEOUT = 900  # seconds to "Run /init" on an emulating host (about 2 minutes measured)


@pytest.fixture(scope="module")
def lean_boot(lean_guest, tmp_path_factory):
    """Boot once, drive QMP during the boot, and collect what happened."""
    tmp = tmp_path_factory.mktemp("lean")
    sock = tmp / "vm.sock"
    log = tmp / "vmm.log"
    obs: dict = {}
    vm = VmProcess(["-kernel", str(lean_guest.bzimage), "-initrd", str(lean_guest.initramfs),
                    "-append", lean_guest.cmdline, "-smp", "2", "-m", f"{MEM_MIB}M",
                    "-serial", "stdio", "-api-channel", f"unix:{sock}", "-D", str(log)])
    try:
        wait_for_path(sock, 60)
        qmp = Qmp(sock)
        obs["status"] = qmp.execute("query-status")[1]
        obs["cpus"] = qmp.execute("query-cpus")[1]["return"]
        obs["tasks"] = set(map(int, os.listdir(f"/proc/{vm.pid}/task")))

        # Pause once the kernel is printing: no console output may appear while it is stopped.
        vm.wait_for(r"Linux version", 300)
        obs["stop"] = qmp.execute("stop")
        obs["paused_status"] = qmp.execute("query-status")[1]
        before = len(vm.out.data)
        time.sleep(3)
        obs["output_while_paused"] = bytes(vm.out.data[before:])
        obs["cont"] = qmp.execute("cont")

        vm.wait_for(r"Run /init as init process", BOOT_TIMEOUT)
        obs["ready_seconds"] = time.monotonic() - vm.started
        try:
            vm.wait_for(r"PYSTRATOVIRT-READY uptime=", 60)
            obs["userspace"] = True
        except AssertionError:
            obs["userspace"] = False
        if obs["userspace"]:
            obs["uname"] = vm.command_shell("uname -r")
            vm.send("reboot -f\n")
        # The guest resets itself: on this host through panic=1 once init has died.
        obs["shutdown"] = qmp.read()
        obs["exit_code"] = vm.wait_exit(120)
        obs["socket_left"] = sock.exists()
        qmp.close()
    finally:
        vm.kill()
    obs["serial"] = vm.serial()
    obs["log"] = log.read_text() if log.exists() else ""
    print(f"\nlean kernel: process start to 'Run /init' in {obs.get('ready_seconds', -1):.1f} s")
    return obs


def test_boots_the_kit_kernel(lean_boot, lean_guest):
    serial = lean_boot["serial"]
    m = re.search(r"Linux version (\S+)", serial)
    assert m and m.group(1) == lean_guest.release
    assert m.group(1).startswith("6.1.")
    assert "Run /init as init process" in serial


def test_two_cpus_brought_up(lean_boot):
    assert re.search(r"smp: Brought up 1 node, 2 CPUs", lean_boot["serial"])


def test_memory_size(lean_boot):
    m = re.search(r"Memory: (\d+)K/(\d+)K available", lean_boot["serial"])
    assert m, "no Memory: line"
    total_kib = int(m.group(2))
    # The kernel counts usable RAM: all of it but the EBDA/BIOS area and a few reserved pages.
    assert MEM_MIB * 1024 * 0.97 <= total_kib <= MEM_MIB * 1024


def test_initramfs_unpacked(lean_boot):
    serial = lean_boot["serial"]
    assert re.search(r"Trying to unpack rootfs image as initramfs|Unpacking initramfs", serial)
    assert "Freeing initrd memory" in serial
    assert "Kernel panic - not syncing: VFS" not in serial


def test_userspace_shell_where_it_works(lean_boot, lean_guest):
    if not lean_boot["userspace"]:
        pytest.skip("guest user space cannot run on this host (its system calls fail); "
                    "the kernel's 'Run /init' line was the ready marker")
    assert lean_boot["uname"] == [lean_guest.release]


def test_qmp_during_linux_boot(lean_boot):
    assert lean_boot["status"]["return"]["status"] == "running"
    cpus = lean_boot["cpus"]
    assert [c["CPU"] for c in cpus] == [0, 1]
    tids = {c["thread_id"] for c in cpus}
    assert len(tids) == 2 and tids <= lean_boot["tasks"]
    events, reply = lean_boot["stop"]
    assert reply == {"return": {}} and [e["event"] for e in events] == ["STOP"]
    assert lean_boot["paused_status"]["return"]["status"] == "paused"
    assert lean_boot["output_while_paused"] == b""
    events, reply = lean_boot["cont"]
    assert reply == {"return": {}} and [e["event"] for e in events] == ["RESUME"]


def test_guest_reset_ends_the_vmm(lean_boot):
    event = lean_boot["shutdown"]
    assert event["event"] == "SHUTDOWN"
    assert event["data"] == {"guest": True, "reason": "guest-reset"}
    assert lean_boot["exit_code"] == 0
    assert not lean_boot["socket_left"]
    assert "guest-reset" in lean_boot["log"]


def test_emulating_host_options_logged(lean_boot):
    from pystratovirt.cpu import pvm
    if not pvm.detect():
        pytest.skip("host KVM runs guest ring 0 natively")
    assert "kvm_pvm" in lean_boot["log"]
    assert re.search(r"Command line: .*noxsave clearcpuid=", lean_boot["serial"])


def test_guest_decompressor_path(lean_guest, tmp_path):
    """kernel-extract=off: the bzImage's own 64-bit entry and in-guest decompressor."""
    vm = VmProcess(["-kernel", str(lean_guest.bzimage), "-append", lean_guest.cmdline,
                    "-machine", "microvm,kernel-extract=off", "-m", "256M", "-serial", "stdio", "-D"])
    with vm:
        vm.wait_for(r"Linux version 6\.1\.", 600)
        assert re.search(r"loaded as bzimage,", vm.err.text())
