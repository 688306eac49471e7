"""A Kata Containers sandbox's life, as Kata's StratoVirt driver performs it, against the real VMM
and the probe guest (reference ../shared/reference/stratovirt-2x-clients.md §1 and §2).

Kata (``src/runtime/virtcontainers/stratovirt.go`` with govmm's ``qemu/qmp.go``):

* **StartVM**: ``exec.Command`` with ``createParams``' argv in its order, the environment replaced
  by ``STRATOVIRT_LOG_LEVEL=info`` alone (``enable_debug = true``, which also adds ``debug
  console=hvc0`` and the console device), the tap queue descriptors as ``cmd.ExtraFiles`` (fd 3,
  ...; Kata closes its copies after the launch), stdout read line by line and classified by
  ``:INFO:``/``:WARN:`` (anything else is logged as an error). Left out of Kata's argv: the
  vhost-vsock device (no vhost modules on this host; its refusal is tested in
  test_cli_dialect2x.py) and virtio-fs (refused: not implemented), i.e. ``shared_fs = "none"``.
* **waitVM**: connect every 50 ms, read the greeting (``major >= 5`` or govmm refuses), send
  ``qmp_capabilities``, wait for its return, close.
* **qmpSetup**: connect again, negotiate, keep the connection (``Check`` every 5 s reuses it).
* **GetThreadIDs**: ``query-cpus`` decoded as Go's ``[]CPUInfo``; the thread ids are pinned
  with ``sched_setaffinity``, so they must be the VMM's real vCPU threads.
* **hotplugBlk** / **HotplugRemoveDevice**: ``blockdev-add`` + ``device_add`` in govmm's bytes,
  then ``device_del``, complete only once both the reply and ``DEVICE_DELETED`` came.
* **StopVM**: ``qmpSetup`` (the connection is open: nothing sent), SIGKILL, no ``quit``; Kata
  removes ``vmPath`` itself.

The guest is driven through hvc0 (Kata's debug console), since Kata's argv has no serial.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

from helpers.decoders import GO_CPU_INFO, go_decode
from helpers.hvc import HvcConsole
from helpers.netns import recv_from_guest
from helpers.vmproc import probe_value

pytestmark = pytest.mark.kvm

MiB = 1 << 20
SECTOR = 512
PEER_MAC = bytes.fromhex("020000aabbcc")
# StratoVirt's log line (what Kata's :INFO:/:WARN: regexes were written for).
LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}: \[\d+\]\[\d+\]\[[^\]]+: \d+\]:"
                      r"(ERROR|WARN|INFO|DEBUG|TRACE): ")


# -- Kata's launch (launchStratovirt, StartVM, logAndWait) ---------------------------------------------------
class KataVmm:
    """The VMM process as Go's exec.Cmd starts it: ``ExtraFiles`` duplicated onto 3, 4, ... in the
    child (Go's forkExec does dup2; posix_spawn's DUP2 actions do the same), stdin /dev/null, the
    environment replaced, stdout on a pipe that a reader thread scans line by line. Stderr, which
    Kata leaves to /dev/null, goes to a file here so the test can read the VMM's log."""

    INFO = re.compile(r"[^:]:INFO: ")
    WARN = re.compile(r"[^:]:WARN: ")

    def __init__(self, argv: list[str], *, env: dict[str, str], extra_files: list[int], stderr: Path):
        read_end, write_end = os.pipe()
        err_fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, write_end, 1),
                   (os.POSIX_SPAWN_DUP2, err_fd, 2)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(extra_files)]
        try:
            self.pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        finally:
            os.close(write_end)
            os.close(err_fd)
        self.stderr = stderr
        self.info: list[str] = []
        self.warn: list[str] = []
        self.errors: list[str] = []
        self.exit_status: int | None = None
        self._reader = threading.Thread(target=self._log_and_wait, args=(read_end,), daemon=True)
        self._reader.start()

    def _log_and_wait(self, fd: int) -> None:
        # bufio.Scanner over cmd.StdoutPipe(): lines, "\r" stripped; then cmd.Wait().
        with os.fdopen(fd, "rb") as pipe:
            for raw in pipe:
                line = raw.rstrip(b"\n").rstrip(b"\r").decode(errors="replace")
                if self.INFO.search(line):
                    self.info.append(line)
                elif self.WARN.search(line):
                    self.warn.append(line)
                else:
                    self.errors.append(line)
        _, status = os.waitpid(self.pid, 0)
        self.exit_status = status

    def alive(self) -> bool:
        return self.exit_status is None and os.path.exists(f"/proc/{self.pid}")

    def wait(self, timeout: float) -> int:
        self._reader.join(timeout)
        assert self.exit_status is not None, "the VMM did not end"
        return self.exit_status

    def kill(self) -> None:
        if self.exit_status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reader.join(10)


# -- govmm's QMP client (src/runtime/pkg/govmm/qemu/qmp.go) ---------------------------------------------------
class QmpFailed(AssertionError):
    pass


def go_marshal(value) -> bytes:
    """json.Marshal of Go maps: keys sorted, compact, and <, >, & escaped as Go's encoder does."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


class Govmm:
    """One QMP connection as govmm runs it: greeting parsed until one line has
    QMP.version.qemu.{major,minor,micro} as numbers (other lines skipped), the major >= 5 gate,
    ``qmp_capabilities`` with no arguments, one command at a time written as ``json.Marshal`` +
    ``\\n``, replies and events told apart as govmm does (``event``; ``return`` of any type;
    ``error`` read as map[string]string; anything else ignored), a command with an event filter
    completing after both its reply and its event, in either order."""

    MAX_LINE = 64 * 1024   # bufio.Scanner's default limit

    def __init__(self, path: Path, timeout: float = 10.0):
        # connect() retried every 50 ms until VmStartTimeout.
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(30)
        self.buf = b""
        self.events: list[dict] = []        # Kata's loopQMPEvent only logs them
        self.unexpected: list[dict] = []    # "Unexpected command response"
        self.sent: list[bytes] = []
        self.version = self._read_greeting()
        if self.version[0] < 5:
            raise QmpFailed(f"govmm requires qemu version 5.0 or later, this is qemu "
                            f"({self.version[0]}.{self.version[1]})")

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
            if b"\n" not in self.buf and len(self.buf) > self.MAX_LINE:
                raise QmpFailed("bufio.Scanner: token too long")
        line, self.buf = self.buf.split(b"\n", 1)
        if len(line) > self.MAX_LINE:
            raise QmpFailed("bufio.Scanner: token too long")
        return line[:-1] if line.endswith(b"\r") else line

    def _read_greeting(self) -> tuple[int, int, int]:
        while True:
            try:
                msg = json.loads(self._line())
                qemu = msg["QMP"]["version"]["qemu"]
                nums = tuple(qemu[k] for k in ("major", "minor", "micro"))
            except (ValueError, KeyError, TypeError):
                continue   # "QMP events are thrown before the QMP version" sometimes
            if all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in nums):
                caps = msg["QMP"].get("capabilities") or []
                self.capabilities = [c for c in caps if isinstance(c, str)]
                return tuple(int(n) for n in nums)

    def execute(self, command: str, arguments: dict | None = None,
                event_filter: tuple[str, str, str] | None = None) -> object:
        msg: dict = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        line = go_marshal(msg) + b"\n"
        self.sent.append(line)
        self.sock.sendall(line)
        reply, seen_event = None, event_filter is None
        while reply is None or not seen_event:
            msg = json.loads(self._line())
            if "event" in msg:
                assert isinstance(msg["timestamp"]["seconds"], int | float)
                self.events.append(msg)
                if event_filter is not None and msg["event"] == event_filter[0] and \
                        (msg.get("data") or {}).get(event_filter[1]) == event_filter[2]:
                    seen_event = True
                continue
            if "return" not in msg and "error" not in msg:
                continue
            if reply is not None:
                self.unexpected.append(msg)
                continue
            reply = msg
        if "error" in reply:
            err = reply["error"]
            assert all(isinstance(v, str) for v in err.values()), err   # map[string]string
            raise QmpFailed(f"QMP command failed: {err.get('desc', '')}")
        return reply["return"]

    def close(self) -> None:
        self.sock.close()


class KataDriver:
    """The QMP side of Kata's stratovirt driver: waitVM, qmpSetup, GetThreadIDs, hotplugBlk,
    HotplugRemoveDevice, Check."""

    def __init__(self, vm_path: Path):
        self.socket = vm_path / "qmp.socket"
        self.qmp: Govmm | None = None
        self.block_slots = [True, False, False, False]   # maxMmioBlkCount; slot 0 is the rootfs

    def wait_vm(self, timeout: float = 10.0) -> None:
        qmp = Govmm(self.socket, timeout)
        try:
            assert qmp.execute("qmp_capabilities") == {}
        finally:
            qmp.close()      # defer s.qmpShutdown()

    def qmp_setup(self) -> Govmm:
        if self.qmp is None:
            self.qmp = Govmm(self.socket)
            assert self.qmp.execute("qmp_capabilities") == {}
        return self.qmp

    def check(self) -> None:
        self.qmp_setup()

    def get_thread_ids(self, num_vcpus: int) -> dict[int, int]:
        delay = 0.05
        for _ in range(10):
            cpus = self.qmp_setup().execute("query-cpus")
            go_decode(cpus, [GO_CPU_INFO], "CPUInfo")
            tids = {c["CPU"]: c["thread_id"] for c in cpus if c.get("thread_id", 0) > 0}
            if len(tids) >= num_vcpus:
                return tids
            time.sleep(delay)
            delay *= 2
        raise AssertionError(f"only {len(tids)} vCPU threads of {num_vcpus}")

    def hotplug_blk(self, dev_id: str, path: str, read_only: bool = False) -> tuple[str, int]:
        drive = ("drive-" + dev_id)[:31]            # MakeNameID
        slot = self.block_slots.index(False)
        self.block_slots[slot] = True
        driver = "file" if os.stat(path).st_mode & 0o170000 == 0o100000 else "host_device"
        qmp = self.qmp_setup()
        qmp.execute("blockdev-add", {"driver": "raw", "node-name": drive, "read-only": read_only,
                                     "file": {"driver": driver, "filename": path, "aio": "native"}})
        qmp.execute("device_add", {"driver": "virtio-blk-mmio", "drive": drive, "id": drive,
                                   "addr": f"{slot}", "romfile": ""})
        return drive, slot

    def hotplug_remove_blk(self, drive: str, slot: int) -> None:
        self.qmp_setup().execute("device_del", {"id": drive}, event_filter=("DEVICE_DELETED", "device", drive))
        self.block_slots[slot] = False

    def disconnect(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None


# -- Kata's command line (createParams, getKernelParams, the devices' getParams) -----------------------------
KERNEL_PARAMS = ("systemd.unit=kata-containers.target systemd.mask=systemd-networkd.service "
                 "systemd.mask=systemd-networkd.socket agent.log=debug agent.cdh_api_timeout=50 "
                 "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 root=/dev/vda1 "
                 "rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 reboot=k panic=1 "
                 "net.ifnames=0 ramdom.trust_cpu=on pci=off iommu=off acpi=off debug console=hvc0")


def kata_params(sandbox: str, vm_path: Path, kernel: str, image: Path, taps: list[tuple[str, str, str]],
                vcpus: int, mem_mib: int) -> list[str]:
    """``taps``: (endpoint name, mac, "fds=N" or "ifname=TAP") per network endpoint."""
    params = ["-name", f"sandbox-{sandbox}", "-uuid", str(uuid.uuid4()), "-smp", str(vcpus), "-m", str(mem_mib),
              "-kernel", kernel, "-append", KERNEL_PARAMS, "-qmp", f"unix:{vm_path}/qmp.socket,server,nowait",
              "-D", "-disable-seccomp", "-machine", "type=microvm,dump-guest-core=off"]
    params += ["-object", "rng-random,id=objrng0,filename=/dev/urandom",
               "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0"]
    params += ["-device", "virtio-serial-device,id=virtio-serial0",
               "-chardev", f"socket,id=charconsole0,path={vm_path}/console.socket,server,nowait",
               "-device", "virtconsole,chardev=charconsole0,id=virtio-console0,nr=0"]
    params += ["-drive", f"id=rootfs,file={image},readonly=on,direct=off",
               "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0"]
    for name, mac, backend in taps:
        params += ["-netdev", f"tap,id={name},{backend}",
                   "-device", f"virtio-net-device,netdev={name},id={name},mac={mac}"]
    return params


def frame_from_guest(hvc: HvcConsole, nic: int, peer: socket.socket, mac: str, fill: int) -> None:
    assert probe_value(hvc.command(f"net {nic} info"), "link") == "up"
    assert probe_value(hvc.command(f"net {nic} info"), "mac") == mac
    hvc.command(f"net {nic} send {PEER_MAC.hex(':')} 88b5 120 {fill:02x}")
    frame = recv_from_guest(peer, 0x88B5)
    assert frame[6:12] == bytes.fromhex(mac.replace(":", "")) and frame[14:] == bytes([fill]) * 106


@pytest.fixture
def vc_dir():
    """A short base like Kata's /run/vc (a UNIX socket path is at most 107 bytes, and Kata's
    <base>/vm/<64-hex sandbox id>/qmp.socket needs ~90 of them)."""
    base = Path(tempfile.mkdtemp(prefix="vc-", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def hot_image():
    # O_DIRECT (govmm's blockdev-add has aio native and no cache member: direct) needs a real disk.
    path = Path(f"/var/tmp/pystratovirt-kata-{os.getpid()}.img")
    data = bytes((i * 29 >> 2) & 0xFF for i in range(4 * MiB))
    path.write_bytes(data)
    yield path, data
    path.unlink()


def test_a_sandbox_life_as_katas_driver_runs_it(probe_elf, ns, tmp_path, vc_dir, hot_image):
    sandbox = secrets.token_hex(32)
    vm_path = vc_dir / "vm" / sandbox
    vm_path.mkdir(parents=True)                 # created before the launch, removed by StopVM
    rootfs = tmp_path / "kata-containers.img"
    root_data = bytes((i * 13 >> 3) & 0xFF for i in range(1 * MiB))
    rootfs.write_bytes(root_data)
    ns.add_tap("tap0_kata")                     # eth0: Kata opens its queue and passes the fd
    ns.add_tap("tap1_kata")                     # eth1: by name
    macs = ("02:42:ac:11:00:02", "02:42:ac:11:00:03")
    tap0 = ns.open_tap("tap0_kata")
    params = kata_params(sandbox, vm_path, str(probe_elf), rootfs,
                         [("eth0", macs[0], "fds=3"), ("eth1", macs[1], "ifname=tap1_kata")], vcpus=2, mem_mib=2048)
    # The VMM runs in the sandbox's network namespace (where the by-name tap lives); the
    # descriptor of eth0 reaches it as fd 3 whatever its number here.
    argv = ["/usr/sbin/ip", "netns", "exec", ns.name, sys.executable, "-m", "pystratovirt", *params]
    try:
        vmm = KataVmm(argv, env={"STRATOVIRT_LOG_LEVEL": "info"}, extra_files=[tap0.fd],
                      stderr=tmp_path / "stderr")
    finally:
        tap0.close()                            # Kata closes its copies after the launch
    kata = KataDriver(vm_path)
    peers = [ns.packet_socket("tap0_kata"), ns.packet_socket("tap1_kata")]
    try:
        # StartVM -> waitVM: connect, negotiate, close.
        kata.wait_vm(timeout=10)
        # The guest (Kata's debug console).
        with HvcConsole(vm_path / "console.socket") as hvc:
            hvc.wait_ready()
            assert f"cmdline: {KERNEL_PARAMS}" in " ".join(hvc.command("cmdline"))
            assert probe_value(hvc.command("blk 0 read 16 8"), "crc32") == \
                f"0x{zlib.crc32(root_data[16 * SECTOR:24 * SECTOR]):08x}"
            assert "RO" in probe_value(hvc.command("blk 0 info"), "features")
            assert "bytes=64" in hvc.command("rng read 64")[0]
            frame_from_guest(hvc, 0, peers[0], macs[0], 0x5a)   # the tap passed as fd 3
            frame_from_guest(hvc, 1, peers[1], macs[1], 0xa5)   # the tap opened by name
            assert os.readlink(f"/proc/{vmm.pid}/fd/3") == "/dev/net/tun"

            # qmpSetup keeps a connection; Check() every 5 s sends nothing on it.
            qmp = kata.qmp_setup()
            kata.check()
            kata.check()
            assert [json.loads(x)["execute"] for x in qmp.sent] == ["qmp_capabilities"]
            assert qmp.version[0] >= 5

            # GetThreadIDs, and the pinning Kata does with them.
            tids = kata.get_thread_ids(2)
            assert sorted(tids) == [0, 1]
            vcpu_tasks = {int(t) for t in os.listdir(f"/proc/{vmm.pid}/task")}
            assert set(tids.values()) <= vcpu_tasks
            for index, tid in tids.items():
                assert Path(f"/proc/{vmm.pid}/task/{tid}/comm").read_text().strip() == f"vcpu{index}"
                cpus = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {min(cpus)})
                assert os.sched_getaffinity(tid) == {min(cpus)}
                os.sched_setaffinity(tid, cpus)

            # hotplugBlk: govmm's bytes, byte for byte (reference §1.6 item 5).
            path, data = hot_image
            dev_id = secrets.token_hex(32)
            drive, slot = kata.hotplug_blk(dev_id, str(path))
            assert (drive, slot) == (f"drive-{dev_id[:25]}", 1)
            assert qmp.sent[-2:] == [
                b'{"arguments":{"driver":"raw","file":{"aio":"native","driver":"file","filename":"' + bytes(path) +
                b'"},"node-name":"' + drive.encode() + b'","read-only":false},"execute":"blockdev-add"}\n',
                b'{"arguments":{"addr":"1","drive":"' + drive.encode() + b'","driver":"virtio-blk-mmio","id":"' +
                drive.encode() + b'","romfile":""},"execute":"device_add"}\n']
            # The guest sees vdb and reads it.
            assert probe_value(hvc.command("blk 1 wait-config 10000"), "capacity") == str(len(data) // SECTOR)
            assert probe_value(hvc.command("blk 1 read 2048 64"), "crc32") == \
                f"0x{zlib.crc32(data[2048 * SECTOR:2112 * SECTOR]):08x}"
            assert probe_value(hvc.command("blk 1 write 4000 8 pattern"), "status") == "0"
            kata.get_thread_ids(2)                 # CreateContainer/StartContainer pin again

            # HotplugRemoveDevice: done only once the reply and DEVICE_DELETED are both in.
            kata.hotplug_remove_blk(drive, slot)
            assert qmp.sent[-1] == b'{"arguments":{"id":"' + drive.encode() + b'"},"execute":"device_del"}\n'
            assert [(e["event"], e["data"]["device"]) for e in qmp.events] == [("DEVICE_DELETED", drive)]
            assert probe_value(hvc.command("blk 1 wait-config 10000"), "capacity") == "0"
            assert qmp.unexpected == []

        # StopVM: qmpSetup (open: nothing sent), SIGKILL, no quit.
        before = len(qmp.sent)
        kata.qmp_setup()
        assert len(qmp.sent) == before
        os.kill(vmm.pid, signal.SIGKILL)
        assert os.WIFSIGNALED(vmm.wait(15)) and os.WTERMSIG(vmm.exit_status) == signal.SIGKILL
        assert not os.path.exists(f"/proc/{vmm.pid}")
        with pytest.raises(EOFError):   # the kept connection ends with the process
            qmp._line()
        # SIGKILL leaves the sockets' files (nobody can remove them); Kata removes vmPath itself.
        assert sorted(os.listdir(vm_path)) == ["console.socket", "qmp.socket"]
        shutil.rmtree(vm_path)
        kata.disconnect()
    finally:
        vmm.kill()
        kata.disconnect()
        for p in peers:
            p.close()

    # Nothing else is left: both taps are free again, the disk holds the guest's write.
    for name in ("tap0_kata", "tap1_kata"):
        ns.open_tap(name).close()
    written = path.read_bytes()[4000 * SECTOR:4008 * SECTOR]
    assert written == b"".join(bytes(((s * 7 + i) & 0xFF) for i in range(SECTOR)) for s in range(4000, 4008))
    # Kata's stdout reader: nothing at all came on stdout (bare -D logs to stderr, as 2.3), so
    # nothing counted as an error; the log is StratoVirt's lines, none of them ERROR.
    assert (vmm.errors, vmm.warn, vmm.info) == ([], [], [])
    log = (tmp_path / "stderr").read_text().splitlines()
    assert log and all(LOG_LINE.match(ln) for ln in log), [ln for ln in log if not LOG_LINE.match(ln)][:5]
    assert not [ln for ln in log if ":ERROR: " in ln]
    assert any(":INFO: VmConfig is " in ln for ln in log) and any(":INFO: Vcpu1 " in ln for ln in log)


def test_govmm_refuses_the_early_dialects_greeting(probe_elf, tmp_path):
    """Why Kata needs the 2.x dialect: the same client against a VM started with the 0.x
    management option (-api-channel) gets govmm's version error (greeting major 4)."""
    from helpers.vmproc import VmProcess, wait_for_path
    sock = tmp_path / "qmp.socket"
    with VmProcess(["-kernel", str(probe_elf), "-api-channel", f"unix:{sock}"]) as vm:
        wait_for_path(sock)
        with pytest.raises(QmpFailed, match=r"^govmm requires qemu version 5.0 or later, this is qemu \(4.0\)$"):
            Govmm(sock)
        vm.kill()
