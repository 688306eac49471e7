"""One whole life cycle of a probe-guest VM, driven as a user and a management client would:
boot with a disk, a NIC, a balloon, an rng and a console on a socket; guest disk and network
I/O, random bytes, console lines both ways; disk and NIC hot-plug and unplug over QMP; balloon
inflate, statistics and deflate; stop, a snapshot, cont; then ``quit`` or SIGTERM.

Shared by the seccomp integration test (which proves the filters allow all of it) and by
``bench/syscalls.py`` (which traces it to measure what each thread kind calls). Every step
checks its result, so a life cycle that "passes" really did each thing.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import zlib
from pathlib import Path

from helpers.netns import NetNs, recv_from_guest
from helpers.vmproc import Qmp, VmProcess, probe_value, wait_for_path

MiB = 1 << 20
RAM = 256 * MiB
SECTOR = 512
GUEST_MAC = "52:54:00:12:34:56"
PEER_MAC = bytes.fromhex("020000aabbcc")
BALLOON_PATH = "/machine/peripheral/balloon"
POOL = 0x2000000  # the probe's balloon pages start at 32 MiB


def _ok(qmp: Qmp, command: str, arguments: dict | None = None) -> tuple[list[dict], object]:
    events, reply = qmp.execute(command, arguments)
    assert "return" in reply, f"{command}: {reply}"
    return events, reply["return"]


class Lifecycle:
    """A VM set up for the life cycle: ``boot()``, then ``exercise()``, then ``quit()`` or
    ``sigterm()``. ``prefix`` wraps the VMM command (e.g. ``strace ...``); it always runs in the
    namespace ``ns`` (its taps are made there)."""

    def __init__(self, probe_elf, workdir: Path, ns: NetNs, *, prefix: list[str] | None = None,
                 extra_args: list[str] | None = None, env: dict | None = None):
        self.probe_elf = probe_elf
        self.dir = Path(workdir)
        self.ns = ns
        self.prefix = prefix or []
        self.extra = extra_args or []
        self.env = env
        self.sock = self.dir / "qmp.sock"
        self.console = self.dir / "console.sock"
        self.root = self.dir / "root.img"
        self.extra_disk = self.dir / "extra.img"
        self.vm: VmProcess | None = None
        self.qmp: Qmp | None = None

    def boot(self, timeout: float = 120) -> VmProcess:
        self.root.write_bytes(bytes((i * 13 >> 3) & 0xFF for i in range(1 << 20)))
        self.extra_disk.write_bytes(os.urandom(2 * MiB))
        for tap in ("tap0", "tap1"):
            self.ns.add_tap(tap)
        args = ["-kernel", str(self.probe_elf), "-serial", "stdio", "-D", "-m", f"{RAM // MiB}M",
                "-smp", "2", "-api-channel", f"unix:{self.sock}",
                "-drive", f"file={self.root},id=rootfs,direct=off",
                "-netdev", f"id=net0,netdev=tap0,mac={GUEST_MAC}",
                "-balloon", "deflate-on-oom=true", "-rng", "random_file=/dev/urandom,bytes_per_sec=65536",
                "-chardev", f"id=console0,path={self.console}", *self.extra]
        self.vm = VmProcess(args, prefix=["ip", "netns", "exec", self.ns.name] + self.prefix, env=self.env)
        self.vm.wait_for(r"(?m)^ready\r?$", timeout)
        wait_for_path(self.sock, timeout)
        self.qmp = Qmp(self.sock, timeout)
        return self.vm

    def exercise(self, timeout: float = 60) -> None:
        vm, qmp = self.vm, self.qmp
        assert vm is not None and qmp is not None
        # Boot disk: read, write, flush.
        data = self.root.read_bytes()
        assert probe_value(vm.command("blk 0 read 0 8", timeout), "crc32") == f"0x{zlib.crc32(data[:8 * SECTOR]):08x}"
        assert probe_value(vm.command("blk 0 write 100 2 5a", timeout), "status") == "0"
        assert probe_value(vm.command("blk 0 flush", timeout), "status") == "0"
        assert self.root.read_bytes()[100 * SECTOR:102 * SECTOR] == b"\x5a" * (2 * SECTOR)

        # Boot NIC: a frame each way.
        peer = self.ns.packet_socket("tap0")
        try:
            vm.command(f"net 0 send {PEER_MAC.hex(':')} 88b5 300 a7", timeout)
            assert recv_from_guest(peer, 0x88B5)[14:] == b"\xa7" * 286
            vm.command("net 0 drain", timeout)
            frame = bytes.fromhex(GUEST_MAC.replace(":", "")) + PEER_MAC + b"\x88\xb6" + os.urandom(200)
            peer.send(frame)
            assert f"crc32=0x{zlib.crc32(frame):08x}" in vm.command("net 0 recv 5000", timeout)[0]
        finally:
            peer.close()

        # Random bytes (rate-limited), and a console line each way over the socket chardev.
        assert "bytes=1024" in " ".join(vm.command("rng read 1024", timeout))
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.settimeout(timeout)
        try:
            console.connect(str(self.console))
            time.sleep(0.2)  # accepted on the console's I/O thread
            vm.command("console write lifecycle says hello", timeout)
            got = b""
            while b"\n" not in got:
                got += console.recv(4096)
            assert got == b"lifecycle says hello\n"
            console.sendall(b"host says hello\r\n")
            assert "console: line 15 bytes: host says hello" in vm.command("console read 5000", timeout)
        finally:
            console.close()

        # Disk hot-plug into slot 1, guest I/O on it, unplug.
        extra = self.extra_disk.read_bytes()
        _ok(qmp, "blockdev-add", {"node-name": "drive-1", "file": {"driver": "file", "filename": str(self.extra_disk)},
                                  "cache": {"direct": False}})
        _ok(qmp, "device_add", {"id": "drive-1", "driver": "virtio-blk-mmio", "addr": "0x1"})
        assert probe_value(vm.command("blk 1 wait-config 10000", timeout), "capacity") == str(len(extra) // SECTOR)
        assert probe_value(vm.command("blk 1 read 64 16", timeout), "crc32") == \
            f"0x{zlib.crc32(extra[64 * SECTOR:80 * SECTOR]):08x}"
        assert probe_value(vm.command("blk 1 write 7 1 pattern", timeout), "status") == "0"
        events, _ = _ok(qmp, "device_del", {"id": "drive-1"})
        assert [e["event"] for e in events] == ["DEVICE_DELETED"]
        assert probe_value(vm.command("blk 1 wait-config 10000", timeout), "capacity") == "0"

        # NIC hot-plug into slot 1 (the tap is opened by name: /dev/net/tun), traffic, unplug.
        _ok(qmp, "netdev_add", {"id": "net-1", "ifname": "tap1"})
        _ok(qmp, "device_add", {"id": "net-1", "driver": "virtio-net-mmio", "addr": "0x1"})
        deadline = time.monotonic() + timeout
        while probe_value(vm.command("net 1 info", timeout), "link") != "up":
            assert time.monotonic() < deadline, "the hot-plugged NIC's link never came up"
            time.sleep(0.1)
        peer = self.ns.packet_socket("tap1")
        try:
            vm.command(f"net 1 send {PEER_MAC.hex(':')} 88b5 64 11", timeout)
            assert len(recv_from_guest(peer, 0x88B5)) == 64
        finally:
            peer.close()
        _ok(qmp, "device_del", {"id": "net-1"})  # releases the netdev too, as in StratoVirt

        # Balloon: inflate (the pages go back to the host), statistics, deflate.
        assert _ok(qmp, "query-balloon")[1] == {"actual": RAM}
        vm.command(f"touch {POOL:x} {16 * MiB:x}", timeout)
        _ok(qmp, "balloon", {"value": RAM - 16 * MiB})
        assert f"balloon: actual={16 * MiB // 4096}" in vm.command("balloon run 4000", 3 * timeout)
        assert _ok(qmp, "query-balloon")[1] == {"actual": RAM - 16 * MiB}
        _ok(qmp, "qom-set", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval", "value": 1})
        assert "balloon: stats answered" in " ".join(vm.command("balloon stats 5000", timeout))
        stats = _ok(qmp, "qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})[1]
        assert stats["last-update"] > 0 and stats["stats"]["stat-total-memory"] <= RAM, stats
        _ok(qmp, "qom-set", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval", "value": 0})
        _ok(qmp, "balloon", {"value": RAM})
        assert "balloon: actual=0" in " ".join(vm.command("balloon run 4000", 3 * timeout))

        # stop, a snapshot of the paused VM, cont: the guest is frozen, saved, then answers again.
        events, _ = _ok(qmp, "stop")
        assert _ok(qmp, "query-status")[1]["status"] == "paused"
        _ok(qmp, "migrate", {"uri": f"file:{self.dir / 'snapshot'}"})
        assert _ok(qmp, "query-migrate")[1]["status"] == "completed"
        _ok(qmp, "cont")
        assert vm.command("echo alive", timeout) == ["alive"]
        _ok(qmp, "query-cpus")
        _ok(qmp, "query-hotpluggable-cpus")

    def quit(self, timeout: float = 60) -> int:
        self.qmp.execute("quit")
        return self.vm.wait_exit(timeout)

    def vmm_pid(self) -> int:
        """The VMM's own pid: the launched process, or (under a prefix such as strace that
        forks it) its descendant that runs pystratovirt."""
        todo = [self.vm.pid]
        while todo:
            pid = todo.pop(0)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            if b"pystratovirt" in cmdline and (not self.prefix or cmdline[0] != self.prefix[0].encode()):
                return pid
            todo.extend(int(c) for c in children)
        raise AssertionError("the VMM process was not found")

    def sigterm(self, timeout: float = 60) -> int:
        os.kill(self.vmm_pid(), signal.SIGTERM)
        return self.vm.wait_exit(timeout)

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.vm is not None:
            if self.prefix and self.vm.proc.poll() is None:
                # Under a prefix such as strace, killing the launched process would leave the
                # VMM itself running (detached): end it first.
                try:
                    os.kill(self.vmm_pid(), signal.SIGKILL)
                except (AssertionError, ProcessLookupError):
                    pass
            self.vm.kill()
