"""virtio-blk and disk hot-plug, driven from inside the probe guest under real KVM.

The probe's virtio-mmio driver finds the six block slots from the kernel command line, reads and
writes sectors; the host checks the bytes in the image file, and hot-plugs disks over QMP.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import zlib

import pytest

from helpers.vmproc import Qmp, VmProcess, probe_value, wait_for_path

pytestmark = pytest.mark.kvm

SECTOR = 512


def pattern(sector: int, count: int) -> bytes:
    """The probe's ``pattern`` fill: byte i of sector s is (s*7 + i) & 0xff."""
    return b"".join(bytes(((s * 7 + i) & 0xFF) for i in range(SECTOR)) for s in range(sector, sector + count))


def make_image(path, size: int, seed: int) -> bytes:
    data = bytes(((i * seed) >> 3) & 0xFF for i in range(size))
    path.write_bytes(data)
    return data


@pytest.fixture
def disks(tmp_path):
    root = tmp_path / "root.img"
    data = make_image(root, 1 << 20, 13)
    return tmp_path, root, data


def boot(probe_elf, sock, *drive_args) -> VmProcess:
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-D", "-api-channel", f"unix:{sock}",
                    *drive_args])
    vm.wait_for(r"(?m)^ready\r?$", 60)
    wait_for_path(sock)
    return vm


def test_six_block_slots_and_boot_drive(probe_elf, disks):
    tmp, root, data = disks
    with boot(probe_elf, tmp / "s", "-drive", f"file={root},id=rootfs,direct=off,serial=SN-42") as vm:
        text = vm.serial()
        assert len(re.findall(r"virtio: \d base=0x[0-9a-f]+ irq=\d+ id=2 \(blk\)", text)) == 6
        info = vm.command("blk 0 info")
        assert probe_value(info, "capacity") == str(len(data) // SECTOR)
        assert "serial=SN-42" in info
        assert "FLUSH" in probe_value(info, "features")
        for slot in range(1, 6):  # empty slots are disks of capacity 0
            assert probe_value(vm.command(f"blk {slot} info"), "capacity") == "0"


def test_guest_reads_host_data_and_host_sees_guest_writes(probe_elf, disks):
    tmp, root, data = disks
    with boot(probe_elf, tmp / "s", "-drive", f"file={root},id=rootfs,direct=off") as vm:
        out = vm.command("blk 0 read 0 8")
        assert probe_value(out, "crc32") == f"0x{zlib.crc32(data[:8 * SECTOR]):08x}"
        assert probe_value(out, "status") == "0"
        out = vm.command("blk 0 read 2000 48")
        assert probe_value(out, "crc32") == f"0x{zlib.crc32(data[2000 * SECTOR:2048 * SECTOR]):08x}"

        assert probe_value(vm.command("blk 0 write 100 4 pattern"), "status") == "0"
        assert probe_value(vm.command("blk 0 write 200 2 5a"), "status") == "0"
        assert probe_value(vm.command("blk 0 flush"), "status") == "0"
        disk = root.read_bytes()
        assert disk[100 * SECTOR:104 * SECTOR] == pattern(100, 4)
        assert disk[200 * SECTOR:202 * SECTOR] == b"\x5a" * (2 * SECTOR)
        assert disk[104 * SECTOR:200 * SECTOR] == data[104 * SECTOR:200 * SECTOR]

        # The reverse: the host changes the file, the guest reads the new bytes.
        fresh = os.urandom(4 * SECTOR)
        with open(root, "r+b") as f:
            f.seek(500 * SECTOR)
            f.write(fresh)
        assert probe_value(vm.command("blk 0 read 500 4"), "crc32") == f"0x{zlib.crc32(fresh):08x}"

        # Past the end of the disk: an I/O error for the guest, nothing for the host file.
        assert probe_value(vm.command("blk 0 read 2047 2"), "status") == "1"


def test_direct_io_drive(probe_elf, tmp_path):
    # O_DIRECT needs a file system that supports it (tmpfs does not); /var/tmp is a disk.
    d = os.path.join("/var/tmp", f"pystratovirt-test-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    img = os.path.join(d, "direct.img")
    try:
        with open(img, "wb") as f:
            f.write(b"\0" * (1 << 20))
        with boot(probe_elf, tmp_path / "s", "-drive", f"file={img},id=d0,direct=on") as vm:
            assert probe_value(vm.command("blk 0 write 3 5 pattern"), "status") == "0"
            assert probe_value(vm.command("blk 0 read 3 5"), "crc32") == f"0x{zlib.crc32(pattern(3, 5)):08x}"
            vm.send("reboot\n")
            assert vm.wait_exit(30) == 0
        with open(img, "rb") as f:
            f.seek(3 * SECTOR)
            assert f.read(5 * SECTOR) == pattern(3, 5)
    finally:
        os.unlink(img)
        os.rmdir(d)


def test_read_only_drive_refuses_writes(probe_elf, disks):
    tmp, root, data = disks
    with boot(probe_elf, tmp / "s", "-drive", f"file={root},id=rootfs,readonly=on,direct=off") as vm:
        assert "RO" in probe_value(vm.command("blk 0 info"), "features").split()
        assert probe_value(vm.command("blk 0 write 0 1 ff force"), "status") == "1"
    assert root.read_bytes() == data


def test_quit_flushes_guest_writes(probe_elf, disks):
    tmp, root, _ = disks
    sock = tmp / "s"
    with boot(probe_elf, sock, "-drive", f"file={root},id=rootfs,direct=off") as vm, Qmp(sock) as qmp:
        assert probe_value(vm.command("blk 0 write 40 8 pattern"), "status") == "0"
        qmp.execute("quit")
        assert vm.wait_exit(30) == 0
    assert root.read_bytes()[40 * SECTOR:48 * SECTOR] == pattern(40, 8)


def test_hot_plug_and_unplug(probe_elf, disks):
    tmp, root, _ = disks
    sock = tmp / "s"
    extra = tmp / "extra.img"
    extra_data = make_image(extra, 3 << 20, 29)
    with boot(probe_elf, sock, "-drive", f"file={root},id=rootfs,direct=off") as vm, Qmp(sock) as qmp:
        events, reply = qmp.execute("blockdev-add", {
            "node-name": "drive-0", "file": {"driver": "file", "filename": str(extra)},
            "cache": {"direct": False}, "read-only": False})
        assert reply == {"return": {}} and events == []
        reply = qmp.execute("device_add", {"id": "drive-0", "driver": "virtio-blk-mmio", "addr": "0x1"})[1]
        assert reply == {"return": {}}
        out = vm.command("blk 1 wait-config 10000")
        assert probe_value(out, "capacity") == str(len(extra_data) // SECTOR)
        expected_crc = zlib.crc32(extra_data[6000 * SECTOR:6016 * SECTOR])
        assert probe_value(vm.command("blk 1 read 6000 16"), "crc32") == f"0x{expected_crc:08x}"
        assert probe_value(vm.command("blk 1 write 7 1 pattern"), "status") == "0"

        events, reply = qmp.execute("device_del", {"id": "drive-0"})
        assert reply == {"return": {}}
        assert [(e["event"], e["data"]) for e in events] == [
            ("DEVICE_DELETED", {"device": "drive-0", "path": "drive-0"})]
        assert probe_value(vm.command("blk 1 wait-config 10000"), "capacity") == "0"
        assert extra.read_bytes()[7 * SECTOR:8 * SECTOR] == pattern(7, 1)  # flushed on unplug

        # The slot can be used again, with lun (lun 0 is vdb, i.e. slot 1).
        qmp.execute("blockdev-add", {"node-name": "drive-1", "file": {"driver": "file", "filename": str(extra)},
                                     "cache": {"direct": False}})
        assert qmp.execute("device_add", {"id": "drive-1", "driver": "virtio-blk-mmio", "lun": 0})[1] == {"return": {}}
        assert probe_value(vm.command("blk 1 wait-config 10000"), "capacity") == str(len(extra_data) // SECTOR)
        # The other disk was never disturbed.
        assert probe_value(vm.command("blk 0 info"), "capacity") == str((1 << 20) // SECTOR)


def test_hot_plug_errors_leave_the_vm_untouched(probe_elf, disks):
    tmp, root, data = disks
    sock = tmp / "s"
    extra = tmp / "extra.img"
    make_image(extra, 1 << 20, 3)

    def error(qmp, cmd, args):
        events, reply = qmp.execute(cmd, args)
        assert events == [] and "error" in reply, reply
        return reply["error"]["desc"]

    def blockdev(name, path):
        return {"node-name": name, "file": {"driver": "file", "filename": str(path)}, "cache": {"direct": False}}

    with boot(probe_elf, sock, "-drive", f"file={root},id=rootfs,direct=off") as vm, Qmp(sock) as qmp:
        assert "No such file" in error(qmp, "blockdev-add", blockdev("d-missing", tmp / "nope.img"))
        assert "regular file" in error(qmp, "blockdev-add", blockdev("d-dir", tmp))
        # The root disk cannot be plugged a second time.
        assert "already used by rootfs" in error(qmp, "blockdev-add", blockdev("d-root", root))
        assert qmp.execute("blockdev-add", blockdev("drive-9", extra))[1] == {"return": {}}
        assert error(qmp, "blockdev-add", blockdev("drive-9", extra)) == "Add the id drive-9 repeatedly"
        assert error(qmp, "device_add", {"id": "drive-9", "driver": "virtio-blk-mmio", "addr": "0x6"}) == \
            "Index 6 is out of bounds 6 for block to add replaceable device"
        assert "already used" in error(qmp, "device_add", {"id": "drive-9", "driver": "virtio-blk-mmio", "addr": "0x0"})
        assert error(qmp, "device_add", {"id": "drive-9", "driver": "virtio-scsi", "addr": "0x2"}).startswith(
            "Unsupported replaceable device type")
        assert error(qmp, "device_add", {"id": "other", "driver": "virtio-blk-mmio", "addr": "0x2"}).startswith(
            "Failed to find the configuration")
        _, reply = qmp.execute("device_del", {"id": "nothing"})
        assert reply["error"] == {"class": "DeviceNotFound", "desc": "Device nothing not found"}
        # Nothing changed: the root disk still reads its data, the other slots are empty.
        assert probe_value(vm.command("blk 0 read 0 4"), "crc32") == f"0x{zlib.crc32(data[:4 * SECTOR]):08x}"
        for slot in range(1, 6):
            assert probe_value(vm.command(f"blk {slot} info"), "capacity") == "0"
        # And the registered backend still plugs in fine afterwards.
        reply = qmp.execute("device_add", {"id": "drive-9", "driver": "virtio-blk-mmio", "addr": "0x5"})[1]
        assert reply == {"return": {}}
        assert probe_value(vm.command("blk 5 wait-config 10000"), "capacity") == str((1 << 20) // SECTOR)


def test_permission_denied_is_a_clear_error(probe_elf, tmp_path):
    """Root bypasses file modes, but not an immutable file: opening it for writing gets EPERM."""
    import shutil
    import subprocess
    chattr = shutil.which("chattr")
    d = os.path.join("/var/tmp", f"pystratovirt-perm-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    img = os.path.join(d, "locked.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    try:
        if chattr is None or subprocess.run([chattr, "+i", img], capture_output=True).returncode != 0:
            pytest.skip("cannot make an immutable file here (chattr or the file system refuses)")
        sock = tmp_path / "s"
        with boot(probe_elf, sock), Qmp(sock) as qmp:
            # blockdev-add opens the image (the one place it is looked at), so it is the one to refuse.
            _, reply = qmp.execute("blockdev-add", {"node-name": "locked", "file": {"driver": "file",
                                                                                   "filename": img},
                                                    "cache": {"direct": False}})
            assert reply["error"]["class"] == "GenericError"
            assert "ermission" in reply["error"]["desc"] or "not permitted" in reply["error"]["desc"]
            # Nothing was registered, so there is nothing to plug or to delete; the slot stays empty.
            _, reply = qmp.execute("device_add", {"id": "locked", "driver": "virtio-blk-mmio", "addr": "0x1"})
            assert reply["error"]["desc"].startswith("Failed to find the configuration")
            _, reply = qmp.execute("blockdev-del", {"node-name": "locked"})
            assert reply["error"]["class"] == "DeviceNotFound"
    finally:
        if chattr is not None:
            subprocess.run([chattr, "-i", img], capture_output=True)
        os.unlink(img)
        os.rmdir(d)


# -- BLOCK_IO_ERROR --------------------------------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs of the test's own: a disk image there runs out of host space for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "pystratovirt-test", str(mnt)],
                   check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, capture_output=True)


def io_errors(qmp: Qmp, events: list[dict], seconds: float) -> list[dict]:
    """BLOCK_IO_ERROR events among ``events`` and whatever else arrives within ``seconds``."""
    found = [e for e in events if e["event"] == "BLOCK_IO_ERROR"]
    deadline = time.monotonic() + seconds
    qmp.sock.settimeout(0.2)
    try:
        while time.monotonic() < deadline:
            try:
                msg = qmp.read()
            except TimeoutError:
                continue
            if msg.get("event") == "BLOCK_IO_ERROR":
                found.append(msg)
    finally:
        qmp.sock.settimeout(30)
    return found


def stamp(event: dict) -> float:
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


def test_host_io_errors_reach_qmp_as_block_io_error(probe_elf, tmp_path, tiny_tmpfs):
    """A disk image on a full tmpfs: the guest's writes get VIRTIO_BLK_S_IOERR, and QMP gets QEMU's
    BLOCK_IO_ERROR naming the disk (device id) and its drive (node-name), ENOSPC as nospace, at once
    for the first error and then at most once a second while errors go on."""
    image = tiny_tmpfs / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)       # sparse: 4 MiB of disk on 256 KiB of host space
    sock, log = tmp_path / "qmp.sock", tmp_path / "vmm.log"
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-D", str(log), "-m", "256",
                    "-qmp", f"unix:{sock},server,nowait",
                    "-drive", f"id=drive-full,file={image},direct=off",
                    "-device", "virtio-blk-device,drive=drive-full,id=disk-full"])
    with vm:
        vm.wait_for(r"(?m)^ready\r?$", 60)
        with Qmp(sock) as qmp:
            qmp.execute("qmp_capabilities")
            # Fill the host file system: 32 KiB per request until the host says no.
            sector, failed_at = 0, None
            while sector < 1024:
                if probe_value(vm.command(f"blk 0 write {sector} 64 pattern"), "status") != "0":
                    failed_at = sector
                    break
                sector += 64
            assert failed_at is not None and 64 * 3 <= failed_at < 1024, failed_at
            first = io_errors(qmp, [], 2.0)
            assert len(first) == 1, first
            assert first[0]["data"] == {"device": "disk-full", "node-name": "drive-full", "operation": "write",
                                        "action": "report", "nospace": True, "reason": "No space left on device"}

            # A guest that keeps failing for ~3 s: one event per second, never one per error.
            started, failures = time.monotonic(), 0
            while time.monotonic() - started < 3.0:
                assert probe_value(vm.command(f"blk 0 write {failed_at + 64} 8 a5"), "status") == "1"
                failures += 1
            burst = io_errors(qmp, [], 2.5)   # the last window's held report comes at its end
            assert failures >= 10, failures
            assert 2 <= len(burst) <= 5, (failures, burst)
            times = [stamp(first[0])] + [stamp(e) for e in burst]
            assert all(b - a >= 0.9 for a, b in zip(times, times[1:], strict=False)), times
            assert all(e["data"]["nospace"] and e["data"]["device"] == "disk-full" for e in burst)

            # Reads of what was written still work; the VM runs on.
            assert probe_value(vm.command("blk 0 read 0 64"), "crc32") == f"0x{zlib.crc32(pattern(0, 64)):08x}"
            assert qmp.execute("query-status")[1]["return"]["status"] == "running"
            qmp.execute("quit")
        assert vm.wait_exit() == 0
    text = log.read_text()
    assert "BLOCK_IO_ERROR: disk disk-full (drive drive-full), write failed: No space left on device" in text
