"""Opt-in tier (``--stock``): Debian's unmodified cloud kernel, booted once, the same checks as
the lean tier. It needs 20+ minutes on a host whose KVM emulates guest ring 0.

Debian's kernel has no MP-table parser (CONFIG_X86_MPPARSE is off): it finds the CPUs and the
IOAPIC through the VMM's ACPI tables (MADT).
"""

from __future__ import annotations

import re
import time

import pytest

from helpers.guestlog import assert_acpi_tables_accepted
from helpers.vmproc import VmProcess

pytestmark = [pytest.mark.stock, pytest.mark.slow, pytest.mark.kvm]

MEM_MIB = 1024
BOOT_TIMEOUT = 3600


@pytest.fixture(scope="module")
def stock_boot(kvm_ok, tmp_path_factory):
    from pystratovirt.guest.kit import ensure_stock_guest
    guest = ensure_stock_guest()
    log = tmp_path_factory.mktemp("stock") / "vmm.log"
    vm = VmProcess(["-kernel", str(guest.vmlinuz), "-initrd", str(guest.initramfs),
                    "-append", guest.cmdline, "-smp", "2", "-m", f"{MEM_MIB}M",
                    "-serial", "stdio", "-D", str(log)])
    obs = {"guest": guest}
    try:
        vm.wait_for(r"Run /init as init process", BOOT_TIMEOUT)
        obs["ready_seconds"] = time.monotonic() - vm.started
        try:
            vm.wait_for(r"PYSTRATOVIRT-READY uptime=", 120)
            obs["userspace"] = True
            obs["uname"] = vm.command_shell("uname -r")
            vm.send("reboot -f\n")
        except AssertionError:
            obs["userspace"] = False
        obs["exit_code"] = vm.wait_exit(300)
    finally:
        vm.kill()
    obs["serial"] = vm.serial()
    obs["log"] = log.read_text() if log.exists() else ""
    print(f"\nstock kernel: process start to 'Run /init' in {obs.get('ready_seconds', -1):.1f} s")
    return obs


def test_stock_kernel_version(stock_boot):
    m = re.search(r"Linux version (\S+)", stock_boot["serial"])
    assert m and m.group(1) == stock_boot["guest"].release


def test_stock_two_cpus(stock_boot):
    assert re.search(r"smp: Brought up 1 node, 2 CPUs", stock_boot["serial"])


def test_stock_acpi_tables_accepted(stock_boot):
    assert_acpi_tables_accepted(stock_boot["serial"], cpus=2)


def test_stock_memory(stock_boot):
    m = re.search(r"Memory: (\d+)K/(\d+)K available", stock_boot["serial"])
    assert m and MEM_MIB * 1024 * 0.97 <= int(m.group(2)) <= MEM_MIB * 1024


def test_stock_initramfs(stock_boot):
    assert "Freeing initrd memory" in stock_boot["serial"]


def test_stock_userspace_where_it_works(stock_boot):
    if not stock_boot["userspace"]:
        pytest.skip("guest user space cannot run on this host (its system calls fail)")
    assert stock_boot["uname"] == [stock_boot["guest"].release]


def test_stock_guest_reset_ends_the_vmm(stock_boot):
    assert stock_boot["exit_code"] == 0
    assert "guest-reset" in stock_boot["log"]
