"""Slow tier: the lean Linux kernel booted once from StratoVirt 2.x's command line, the way Kata
and hydropper start their guests: ``console=hvc0`` on a socket chardev (``-device
virtio-serial-device -chardev socket,...,server,nowait -device virtconsole``), a virtio-rng
(``-object rng-random`` + ``-device virtio-rng-device``), the root disk as ``-drive`` + ``-device
virtio-blk-device``, ``-qmp``, a bare ``-m`` in MiB. One boot serves every check.

What is observed without guest user space:

* the console: every kernel message from hvc0's registration on arrives on the socket, in order
  and complete (the UART, ``console=ttyS0``, prints the same lines to compare with), and the VMM
  dropped nothing. Linux 6.1's virtio_console registers the hvc console (which replays the log
  buffer) before the port can carry bytes, so the replayed earlier lines are discarded by the
  guest itself: the socket's log starts at hvc0's registration, about 30 s into the boot here;
* the rng: the kernel's hwrng core reads the device as soon as virtio_rng registers (the VMM logs
  the first request, and the totals at exit), and credits it, so the kernel prints ``random:
  crng init done`` right away (without the rng this kernel on this host reaches ``Run /init``
  with its pool still uninitialised);
* the disk: virtio_blk finds vda with the image's size (and the five empty slots with none).
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from helpers.vmproc import Qmp, VmProcess, connect_unix, wait_for_path

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

BOOT_TIMEOUT = 900
DISK_BYTES = 24 << 20


@pytest.fixture(scope="module")
def boot(lean_guest, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hvc")
    con, qmp_sock, log, disk = tmp / "console.sock", tmp / "qmp.sock", tmp / "vmm.log", tmp / "rootfs.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    obs: dict = {}
    vm = VmProcess(["-name", "sandbox-hvc", "-smp", "1", "-m", "256", "-kernel", str(lean_guest.bzimage),
                    "-initrd", str(lean_guest.initramfs), "-append", f"{lean_guest.cmdline} console=hvc0",
                    "-qmp", f"unix:{qmp_sock},server,nowait", "-D", str(log),
                    "-machine", "type=microvm,dump-guest-core=off", "-serial", "stdio",
                    "-object", "rng-random,id=objrng0,filename=/dev/urandom",
                    "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0",
                    "-device", "virtio-serial-device,id=virtio-serial0",
                    "-chardev", f"socket,id=charconsole0,path={con},server,nowait",
                    "-device", "virtconsole,chardev=charconsole0,id=virtio-console0,nr=0",
                    "-drive", f"id=rootfs,file={disk},direct=off",
                    "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0"])
    received = bytearray()
    try:
        wait_for_path(con, 60)
        client = connect_unix(con, 10)

        def pump() -> None:
            while chunk := client.recv(65536):
                received.extend(chunk)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()

        vm.wait_for(r"Run /init as init process", BOOT_TIMEOUT)
        obs["ready_seconds"] = time.monotonic() - vm.started
        # On a host whose guest system calls fail, init dies and panic=1 resets the guest,
        # which ends the VMM; where user space works, quit over QMP.
        try:
            obs["exit_code"] = vm.wait_exit(60)
        except AssertionError:
            with Qmp(qmp_sock) as qmp:
                qmp.execute("quit")
            obs["exit_code"] = vm.wait_exit(60)
        reader.join(10)
        client.close()
    finally:
        vm.kill()
    obs["hvc_bytes"] = bytes(received)
    obs["hvc"] = received.decode(errors="replace")
    obs["serial"] = vm.serial()
    obs["log"] = log.read_text() if log.exists() else ""
    obs["socket_left"] = con.exists()
    print(f"\nlean kernel with hvc0 + rng: process start to 'Run /init' in {obs.get('ready_seconds', -1):.1f} s; "
          f"{len(received)} bytes on the console socket")
    return obs


def kernel_lines(text: str) -> list[str]:
    return [ln.rstrip("\r") for ln in text.splitlines() if re.match(r"\[\s*\d+\.\d+\] ", ln)]


def test_boot_log_arrives_on_the_console_socket(boot):
    hvc = kernel_lines(boot["hvc"])
    serial = kernel_lines(boot["serial"])
    enabled = next(i for i, ln in enumerate(serial) if "printk: console [hvc0] enabled" in ln)
    # Everything the UART printed after hvc0 came up, up to the end of the boot, in order.
    expected = serial[enabled + 1:]
    assert len(expected) > 10
    assert hvc[:len(expected)] == expected
    assert any("Run /init as init process" in ln for ln in hvc)
    # Nothing lost on the way: the chardev took every byte the guest sent.
    m = re.search(r"console0: guest sent (\d+) bytes \(0 beyond a chain's limit\), received 0; chardev "
                  r"charconsole0 took (\d+), dropped 0", boot["log"])
    assert m and m.group(1) == m.group(2) == str(len(boot["hvc_bytes"]))


def test_kernel_found_the_console_and_rng_windows(boot):
    serial = boot["serial"]   # these come before hvc0 exists
    # No balloon: the rng has window 8 (IRQ 13), the console window 9 (IRQ 14).
    assert re.search(r"virtio-mmio: Registering device virtio-mmio\.\d+ at 0xf0101000-0xf01011ff, IRQ 13", serial)
    assert re.search(r"virtio-mmio: Registering device virtio-mmio\.\d+ at 0xf0101200-0xf01013ff, IRQ 14", serial)
    assert not re.search(r"probe of virtio\d+ failed", serial)


def test_rng_driver_registered_and_requests_grow(boot):
    assert "random: crng init done" in boot["serial"]
    log = boot["log"]
    assert "rng: driver ready (source /dev/urandom, no limit)" in log
    first = re.search(r"rng: first request served \((\d+) bytes\)", log)
    assert first, log[-3000:]
    total = re.search(r"rng: served (\d+) requests, (\d+) bytes", log)
    assert total
    requests, nbytes = int(total.group(1)), int(total.group(2))
    assert requests >= 2 and nbytes > int(first.group(1))
    assert "console0: driver ready on chardev charconsole0 (socket)" in log


def test_the_vmm_ends_cleanly_and_removes_the_socket(boot):
    assert boot["exit_code"] == 0
    assert not boot["socket_left"]


def test_the_disk_given_as_drive_and_device_is_found_with_its_size(boot):
    serial = boot["serial"]
    sectors = DISK_BYTES // 512
    assert re.search(rf"virtio_blk virtio\d+: \[vda\] {sectors} 512-byte logical blocks \(25\.2 MB/24\.0 MiB\)",
                     serial), re.findall(r".*\[vda\].*", serial)
    for name in "bcdef":   # the empty slots
        assert re.search(rf"\[vd{name}\] 0 512-byte logical blocks", serial)
    assert "blk0: backend " in boot["log"] and f", {sectors} sectors" in boot["log"]
    # StratoVirt 2.x's dialect, from its -qmp: the log says so.
    assert "dialect=<Dialect.V2: '2.x'>" in boot["log"]
