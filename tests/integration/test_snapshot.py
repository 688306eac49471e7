"""Snapshots under real KVM with the probe guest: ``stop`` + ``migrate {"uri":"file:DIR"}`` in one
VMM process, ``-incoming file:DIR`` in a new one, and the guest carries on where it stopped --
its memory, console, clock, both vCPUs, disks (hot-plugged ones too), NIC and balloon -- without
booting again. Broken or mismatched snapshots end the new process before the guest runs, with
one line on stderr. Clones of one snapshot share its unchanged pages.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
import zlib

import pytest

from helpers.netns import recv_from_guest
from helpers.vmproc import Qmp, VmProcess, probe_value, run_stratovirt, wait_for_path
from pystratovirt.cpu import pvm

pytestmark = pytest.mark.kvm

MiB = 1 << 20
SECTOR = 512
AREA = 0x4000000            # 64 MiB: free RAM above the probe (loaded at 16 MiB)
GUEST_MAC = "52:54:00:12:34:56"
PEER_MAC = bytes.fromhex("020000aabbcc")


def kv(lines: list[str], key: str) -> str:
    """A probe reply's value up to its first space (one line may carry several key=value pairs)."""
    return probe_value(lines, key, value=r"\S*")


def start(probe_elf, sock, *extra, ready: bool = True, prefix=None) -> VmProcess:
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-api-channel", f"unix:{sock}", *extra],
                   prefix=prefix)
    if ready:
        vm.wait_for(r"(?m)^ready\r?$", 60)
    wait_for_path(sock)
    return vm


def snapshot_and_quit(vm: VmProcess, sock, directory) -> dict:
    """stop, migrate, query-migrate and quit, as hydropper does; returns query-migrate's answer."""
    with Qmp(sock) as qmp:
        events, reply = qmp.execute("stop")
        assert reply == {"return": {}} and [e["event"] for e in events] == ["STOP"]
        assert qmp.execute("migrate", {"uri": f"file:{directory}"})[1] == {"return": {}}
        info = qmp.execute("query-migrate")[1]["return"]
        qmp.execute("quit")
    assert vm.wait_exit() == 0
    os.unlink(sock) if os.path.exists(sock) else None
    return info


def restore(probe_elf, sock, directory, *extra, prefix=None) -> VmProcess:
    vm = start(probe_elf, sock, *extra, "-incoming", f"file:{directory}", ready=False, prefix=prefix)
    return vm


def ticks(vm) -> int:
    return int(kv(vm.command("ticks"), "ticks"))


# -- memory, console, clock, vCPUs -------------------------------------------------------------------
def test_the_guest_carries_on_where_it_stopped(probe_elf, tmp_path):
    sock, snap = tmp_path / "s", tmp_path / "snap"
    args = ("-smp", "2", "-m", "256M")
    values = {AREA + 0x1000 * i + 8 * i: (0x1122334455667788 * (i + 1)) & (1 << 64) - 1 for i in range(16)}
    expected = bytearray(0x20000)
    for addr, value in values.items():
        struct.pack_into("<Q", expected, addr - AREA, value)
    crc = f"0x{zlib.crc32(expected):08x}"

    vm = start(probe_elf, sock, *args)
    try:
        assert vm.command("ipi 1") == ["cpu 1: ipis=1"]
        for addr, value in values.items():
            vm.command(f"poke {addr:x} {value:x} 8")
        assert kv(vm.command(f"crc32 {AREA:x} 20000"), "crc32") == crc
        t0 = ticks(vm)
        time.sleep(0.5)
        rate = (ticks(vm) - t0) / 0.5          # guest TSC ticks per second, roughly
        with Qmp(sock) as qmp:
            assert qmp.execute("query-migrate")[1] == {"return": {"status": "none"}}
            assert qmp.execute("migrate", {"uri": f"file:{snap}"})[1] == {"error": {
                "class": "GenericError",
                "desc": "The VM is running: pause it with 'stop' before saving a snapshot with 'migrate'."}}
        before = ticks(vm)
        info = snapshot_and_quit(vm, sock, snap)
    finally:
        vm.kill()
    assert info["status"] == "completed" and info["total-time"] >= 0
    assert info["ram"]["total"] == 256 * MiB and info["ram"]["remaining"] == 0
    assert info["ram"]["normal"] + info["ram"]["duplicate"] == 256 * MiB // 4096
    assert sorted(os.listdir(snap)) == ["memory", "state"]
    assert os.stat(snap / "memory").st_size == 256 * MiB
    assert os.stat(snap / "memory").st_blocks * 512 < 16 * MiB   # sparse: the zero pages are holes

    time.sleep(2)  # the pause between save and restore must not show in the guest's clock
    vm = restore(probe_elf, sock, snap, *args)
    try:
        with Qmp(sock) as qmp:
            assert qmp.execute("query-status")[1]["return"]["status"] == "running"
        assert vm.command("echo back") == ["back"]
        after = ticks(vm)
        assert after > before   # the clock goes on from where it was, it does not start over
        if not pvm.detect():
            # KVM offsets the guest's TSC so the two seconds between save and restore do not
            # show. A PVM host runs guest rdtsc unvirtualized: the guest reads the host's TSC.
            assert (after - before) / rate < 1.5, (before, after, rate)
        assert kv(vm.command(f"crc32 {AREA:x} 20000"), "crc32") == crc
        for addr, value in list(values.items())[:3]:
            assert kv(vm.command(f"peek {addr:x} 8"), "value") == f"0x{value:016x}"
        assert vm.command("ipi 1") == ["cpu 1: ipis=2"]   # the AP runs, with its count
        assert kv(vm.command("cpus"), "cpus online") == "2"
        # It never booted again: the console shows only the commands' output.
        serial = vm.serial()
        assert "ready" not in serial and "pystratovirt probe guest" not in serial
        assert serial.startswith("back")
    finally:
        vm.kill()


def test_restore_with_freeze_waits_for_cont(probe_elf, tmp_path):
    sock, snap = tmp_path / "s", tmp_path / "snap"
    vm = start(probe_elf, sock)
    try:
        snapshot_and_quit(vm, sock, snap)
    finally:
        vm.kill()
    vm = restore(probe_elf, sock, snap, "-S")
    try:
        with Qmp(sock) as qmp:
            assert qmp.execute("query-status")[1]["return"] == {"running": False, "singlestep": False,
                                                                 "status": "paused"}
            vm.send("echo hi\n")
            time.sleep(0.5)
            assert vm.serial() == ""           # paused: nothing runs
            events, reply = qmp.execute("cont")
            assert reply == {"return": {}} and [e["event"] for e in events] == ["RESUME"]
        vm.wait_for(r"(?m)^hi\r?\nok\r?$", 10)
        # A restored VM can be saved again, and that snapshot restores too.
        snapshot_and_quit(vm, sock, tmp_path / "snap2")
    finally:
        vm.kill()
    vm = restore(probe_elf, sock, tmp_path / "snap2")
    try:
        assert vm.command("echo third") == ["third"]
    finally:
        vm.kill()


# -- disks ------------------------------------------------------------------------------------------
def pattern(sector: int, count: int) -> bytes:
    return b"".join(bytes(((s * 7 + i) & 0xFF) for i in range(SECTOR)) for s in range(sector, sector + count))


def test_boot_and_hot_plugged_disks_are_reattached(probe_elf, tmp_path):
    sock, snap = tmp_path / "s", tmp_path / "snap"
    root, hot = tmp_path / "root.img", tmp_path / "hot.img"
    root.write_bytes(bytes(1 * MiB))
    hot.write_bytes(bytes(2 * MiB))
    args = ("-drive", f"file={root},id=rootfs,direct=off,serial=ROOT")
    vm = start(probe_elf, sock, *args)
    try:
        with Qmp(sock) as qmp:
            assert qmp.execute("blockdev-add", {"node-name": "drive-1", "cache": {"direct": False},
                                                "file": {"driver": "file", "filename": str(hot)}})[1] == {"return": {}}
            assert qmp.execute("device_add", {"id": "drive-1", "driver": "virtio-blk-mmio", "addr": "0x1",
                                              "serial": "HOT"})[1] == {"return": {}}
        vm.command("blk 1 wait-config 5000")
        assert kv(vm.command("blk 1 info"), "capacity") == "4096"
        assert kv(vm.command("blk 0 write 10 4 pattern"), "status") == "0"
        assert kv(vm.command("blk 1 write 20 2 a5"), "status") == "0"
        snapshot_and_quit(vm, sock, snap)
    finally:
        vm.kill()
    assert root.read_bytes()[10 * SECTOR:14 * SECTOR] == pattern(10, 4)

    vm = restore(probe_elf, sock, snap, *args)   # the original command line: drive-1 comes from the snapshot
    try:
        info = vm.command("blk 1 info")
        assert kv(info, "capacity") == "4096" and "serial=HOT" in info
        assert kv(vm.command("blk 0 read 10 4"), "crc32") == f"0x{zlib.crc32(pattern(10, 4)):08x}"
        filled = zlib.crc32(bytes([0xA5]) * 1024)
        assert kv(vm.command("blk 1 read 20 2"), "crc32") == f"0x{filled:08x}"
        assert kv(vm.command("blk 1 write 30 1 pattern"), "status") == "0"
        assert kv(vm.command("blk 0 write 40 1 3c"), "status") == "0"
        assert kv(vm.command("blk 0 flush"), "status") == "0"
        assert kv(vm.command("blk 1 flush"), "status") == "0"
        with Qmp(sock) as qmp:   # and it can be unplugged as usual
            events, reply = qmp.execute("device_del", {"id": "drive-1"})
            assert reply == {"return": {}} and events[0]["data"]["device"] == "drive-1"
    finally:
        vm.kill()
    assert hot.read_bytes()[30 * SECTOR:31 * SECTOR] == pattern(30, 1)
    assert root.read_bytes()[40 * SECTOR:41 * SECTOR] == b"\x3c" * SECTOR


# -- the NIC ----------------------------------------------------------------------------------------------

def frames_both_ways(vm, peer, fill: int) -> None:
    vm.command(f"net 0 send {PEER_MAC.hex(':')} 88b5 200 {fill:02x}")
    frame = recv_from_guest(peer, 0x88B5)
    assert frame[6:12] == bytes.fromhex(GUEST_MAC.replace(":", "")) and frame[14:] == bytes([fill]) * 186
    out = bytes.fromhex(GUEST_MAC.replace(":", "")) + PEER_MAC + b"\x88\xb6" + os.urandom(500)
    peer.send(out)
    line = vm.command("net 0 recv 5000")[0]
    assert f"crc32=0x{zlib.crc32(out):08x}" in line


def test_the_nic_passes_frames_after_restore(probe_elf, ns, tmp_path):
    sock, snap = tmp_path / "s", tmp_path / "snap"
    ns.add_tap("tap0")
    peer = ns.packet_socket("tap0")
    prefix = ["ip", "netns", "exec", ns.name]
    args = ("-netdev", f"id=net0,netdev=tap0,mac={GUEST_MAC}")
    try:
        vm = start(probe_elf, sock, *args, prefix=prefix)
        try:
            frames_both_ways(vm, peer, 0x11)
            snapshot_and_quit(vm, sock, snap)
        finally:
            vm.kill()
        vm = restore(probe_elf, sock, snap, *args, prefix=prefix)
        try:
            info = vm.command("net 0 info")
            assert kv(info, "mac") == GUEST_MAC and kv(info, "link") == "up"
            # The receive buffers the guest posted before the snapshot take frames again.
            frames_both_ways(vm, peer, 0x22)
            frames_both_ways(vm, peer, 0x33)
        finally:
            vm.kill()
    finally:
        peer.close()


# -- the balloon ------------------------------------------------------------------------------------------
def test_the_balloon_keeps_its_size(probe_elf, tmp_path):
    sock, snap = tmp_path / "s", tmp_path / "snap"
    ram = 512 * MiB
    args = ("-m", "512M", "-balloon", "deflate-on-oom=true")
    vm = start(probe_elf, sock, *args)
    try:
        with Qmp(sock) as qmp:
            qmp.execute("balloon", {"value": ram - 64 * MiB})
            assert "balloon: actual=16384" in vm.command("balloon run 8000", timeout=120)
            assert qmp.execute("query-balloon")[1] == {"return": {"actual": ram - 64 * MiB}}
        snapshot_and_quit(vm, sock, snap)
    finally:
        vm.kill()
    vm = restore(probe_elf, sock, snap, *args)
    try:
        with Qmp(sock) as qmp:
            assert qmp.execute("query-balloon")[1] == {"return": {"actual": ram - 64 * MiB}}
            assert "num_pages=16384" in " ".join(vm.command("balloon info"))
            qmp.execute("balloon", {"value": ram})
            assert "balloon: actual=0" in vm.command("balloon run 8000", timeout=120)
            assert qmp.execute("query-balloon")[1] == {"return": {"actual": ram}}
    finally:
        vm.kill()


# -- the rng and the console ------------------------------------------------------------------------------
def console_client(path) -> socket.socket:
    wait_for_path(path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(30)
    client.connect(str(path))
    time.sleep(0.2)   # accepted on the console's I/O thread
    return client


def console_round_trip(vm, client, word: str) -> None:
    vm.command(f"console write {word} from the guest")
    got = b""
    while b"\n" not in got:
        got += client.recv(4096)
    assert got == f"{word} from the guest\n".encode()
    client.sendall(f"{word} from the host\r\n".encode())
    line = f"{word} from the host"
    assert f"console: line {len(line)} bytes: {line}" in vm.command("console read 5000")


def rng_fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_rng_and_console_work_after_restore(probe_elf, tmp_path):
    """A VM with a rate-limited rng and a console on a socket chardev. The snapshot is taken while
    the probe's rng read waits for the next period (the device holds its request) and while the
    console holds the receive buffers the probe posted at start: both are given back to their
    rings, so after the restore the read completes and host input reaches the guest."""
    sock, snap, con = tmp_path / "s", tmp_path / "snap", tmp_path / "console.sock"
    args = ("-rng", "random_file=/dev/urandom,bytes_per_sec=64", "-chardev", f"id=console0,path={con}")
    vm = start(probe_elf, sock, *args)
    try:
        client = console_client(con)
        try:
            console_round_trip(vm, client, "before")
        finally:
            client.close()
        assert rng_fields(vm.command("rng read 64")[0])["bytes"] == "64"
        # 64 bytes a second: a 256-byte read takes four periods. Save it in the middle.
        before = len(vm.serial())
        vm.send("rng read 256\n")
        time.sleep(1.5)
        snapshot_and_quit(vm, sock, snap)
        assert not con.exists()
        assert vm.serial()[before:] == ""   # the read had not finished
    finally:
        vm.kill()

    vm = restore(probe_elf, sock, snap, *args)
    try:
        # The read goes on where it stopped, still rate-limited, and finishes with all its bytes.
        m = vm.wait_for(r"(?m)^(rng: [^\r\n]*)\r?\n(ok|error: [^\r\n]*)\r?$", 30)
        assert m.group(2) == "ok", m.group(0)
        assert rng_fields(m.group(1))["bytes"] == "256"
        assert rng_fields(vm.command("rng read 64")[0])["bytes"] == "64"
        client = console_client(con)
        try:
            console_round_trip(vm, client, "after")
            console_round_trip(vm, client, "again")
        finally:
            client.close()
    finally:
        vm.kill()
    # The same devices are needed: here the console is missing.
    res = run_stratovirt(["-kernel", str(probe_elf), "-incoming", f"file:{snap}", args[0], args[1]])
    assert res.returncode == 1 and res.stderr == ("stratovirt: The snapshot's VM has 1 console device(s), but "
                                                  "the command line gives 0.\n"), res.stderr


# -- broken and mismatched snapshots ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(probe_elf, tmp_path_factory):
    """One snapshot of a 2-vCPU, 256 MiB probe, for the failure cases to spoil copies of."""
    d = tmp_path_factory.mktemp("saved")
    vm = start(probe_elf, d / "s", "-smp", "2", "-m", "256M")
    try:
        snapshot_and_quit(vm, d / "s", d / "snap")
    finally:
        vm.kill()
    return d / "snap"


def spoiled(saved, tmp_path, spoil) -> str:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "state").write_bytes((saved / "state").read_bytes())
    os.link(saved / "memory", copy / "memory") if spoil is None else None
    if not (copy / "memory").exists():
        with open(copy / "memory", "wb") as f:
            f.truncate(os.stat(saved / "memory").st_size)
    if spoil is not None:
        spoil(copy)
    return str(copy)


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("spoil, args, message", [
    (lambda d: flip(d / "state", 300), (), "The snapshot's state file is corrupted: its checksum does not match."),
    (lambda d: (d / "state").write_bytes((d / "state").read_bytes()[:1000]), (),
     "The snapshot's state file is truncated: it has 1000 bytes, its header says"),
    (lambda d: flip(d / "state", 8), (), "has format version 66, newer than this pystratovirt reads (2)"),
    (lambda d: os.truncate(d / "memory", 128 * MiB), (),
     "The snapshot's memory file is 134217728 bytes, but its state says 268435456"),
    (lambda d: (d / "memory").unlink(), (), "has no memory file"),
    (lambda d: (d / "state").unlink(), (), "There is no snapshot state file at"),
    (None, ("-m", "512M"), "The snapshot was taken with 256 MiB of memory, but the command line gives 512 MiB."),
    (None, ("-smp", "1"), "The snapshot was taken with 2 vCPU(s), but the command line gives 1 vCPU(s)."),
    (None, ("-balloon",), "The snapshot's VM has no balloon device, but the command line adds one."),
    (None, ("-rng", "random_file=/dev/urandom"), "The snapshot's VM has no rng device, but the command line adds one."),
])
def test_a_bad_snapshot_ends_the_process_with_one_line(probe_elf, saved, tmp_path, spoil, args, message):
    directory = spoiled(saved, tmp_path, spoil)
    base = {"-m": "256M", "-smp": "2"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1] if i + 1 < len(args) else None
    argv = ["-kernel", str(probe_elf), "-serial", "stdio", "-incoming", f"file:{directory}"]
    for key, value in base.items():
        argv += [key] if value is None else [key, value]
    res = run_stratovirt(argv)
    assert res.returncode == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stratovirt: ") and message in lines[0], res.stderr
    assert res.stdout == ""   # the guest never ran


# -- clones ---------------------------------------------------------------------------------------------------
def mapping_stats(pid: int, path) -> dict[str, int]:
    """Rss, Shared_Clean and Private_Dirty (bytes) of the process's mapping of ``path``."""
    wanted = os.path.realpath(path)
    stats, inside = {}, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                inside = len(fields) >= 6 and fields[5] == wanted
            elif inside and fields[0].rstrip(":") in ("Rss", "Shared_Clean", "Private_Dirty"):
                stats[fields[0].rstrip(":")] = int(fields[1]) * 1024
    return stats


def test_clones_share_the_snapshots_unchanged_pages(probe_elf, tmp_path):
    snap = tmp_path / "snap"
    touched = 32 * MiB
    pages = touched // 4096
    xor = 0
    for page in range(AREA, AREA + touched, 4096):
        xor ^= page
    vm = start(probe_elf, tmp_path / "s", "-m", "256M")
    try:
        vm.command(f"touch {AREA:x} {touched:x} stamp", timeout=120)   # 32 MiB of data in the snapshot
        snapshot_and_quit(vm, tmp_path / "s", snap)
    finally:
        vm.kill()
    clones = []
    try:
        for i in range(3):
            clone = restore(probe_elf, tmp_path / f"c{i}", snap, "-m", "256M")
            clones.append(clone)
            # Reading the pages maps them from the page cache; nothing is copied.
            assert clone.command(f"touch {AREA:x} {touched:x} read", timeout=120) == \
                [f"touched: {pages} pages xor={xor:#x}"]
        clones[0].command(f"touch {AREA:x} {1 * MiB:x}")   # one clone writes: only it gets copies
        for i, clone in enumerate(clones):
            stats = mapping_stats(clone.pid, snap / "memory")
            assert stats["Shared_Clean"] >= touched - 1 * MiB, (i, stats)
            assert stats["Private_Dirty"] < (2 * MiB if i else 4 * MiB), (i, stats)
    finally:
        for clone in clones:
            clone.kill()


def test_a_disk_that_changed_or_went_away_is_named(probe_elf, tmp_path):
    sock, snap = tmp_path / "s", tmp_path / "snap"
    root, hot = tmp_path / "root.img", tmp_path / "hot.img"
    root.write_bytes(bytes(1 * MiB))
    hot.write_bytes(bytes(1 * MiB))
    vm = start(probe_elf, sock, "-drive", f"file={root},id=rootfs,direct=off")
    try:
        with Qmp(sock) as qmp:
            qmp.execute("blockdev-add", {"node-name": "drive-1", "file": {"driver": "file", "filename": str(hot)}})
            assert qmp.execute("device_add", {"id": "drive-1", "driver": "virtio-blk-mmio", "addr": "0x1"})[1] == \
                {"return": {}}
        snapshot_and_quit(vm, sock, snap)
    finally:
        vm.kill()
    bigger = tmp_path / "bigger.img"
    bigger.write_bytes(bytes(2 * MiB))
    base = ["-kernel", str(probe_elf), "-incoming", f"file:{snap}"]
    res = run_stratovirt(base + ["-drive", f"file={bigger},id=rootfs,direct=off"])
    assert res.returncode == 1 and res.stderr == (
        "stratovirt: The snapshot does not fit this machine: blk0: the guest knows a disk of 2048 sectors, "
        f"but the disk {bigger} has 4096 sectors.\n")
    hot.unlink()
    res = run_stratovirt(base + ["-drive", f"file={root},id=rootfs,direct=off"])
    assert res.returncode == 1 and res.stderr == (
        f"stratovirt: Cannot reattach the snapshot's disks and NICs: Drive file '{hot}' does not exist: "
        "No such file or directory.\n")
