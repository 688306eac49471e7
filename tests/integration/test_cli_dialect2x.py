"""The real ``stratovirt`` process started with StratoVirt 2.x command lines (the dialect Kata, Kuasar
and hydropper send), the probe guest under real KVM: a disk given as -drive + -device, taps by name
and by an inherited descriptor, -daemonize with -pidfile, StratoVirt's log lines, and the refusals.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import zlib

import pytest

from helpers.netns import recv_from_guest
from helpers.vmproc import STRATOVIRT, Qmp, VmProcess, probe_value, run_stratovirt

pytestmark = pytest.mark.kvm

SECTOR = 512
GUEST_MAC = "52:54:00:12:34:56"
PEER_MAC = bytes.fromhex("020000aabbcc")
UUID = "6e7b0e90-3b2e-4179-bc30-43d2b5b5964f"
# StratoVirt's log line (util/src/logger.rs): what hydropper and Kata parse.
LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}: \[(\d+)\]\[(\d+)\]\[[^\]]+: \d+\]:"
                      r"(ERROR|WARN|INFO|DEBUG|TRACE): (.*)$")


def base_argv(probe_elf, sock, *extra: str) -> list[str]:
    """Kata's createParams shape (§1.3), for the probe guest: -serial stdio so the test can drive it."""
    return ["-name", "sandbox-test", "-uuid", UUID, "-smp", "1", "-m", "256", "-kernel", str(probe_elf),
            "-append", "console=ttyS0 reboot=k panic=1", "-qmp", f"unix:{sock},server,nowait", "-D",
            "-disable-seccomp", "-machine", "type=microvm,dump-guest-core=off", "-serial", "stdio", *extra]


def boot(argv, **kw) -> VmProcess:
    vm = VmProcess(argv, **kw)
    vm.wait_for(r"(?m)^ready\r?$", 60)
    return vm


def test_disk_from_drive_and_device_is_read_by_the_guest(probe_elf, tmp_path):
    image = tmp_path / "rootfs.img"
    data = bytes(((i * 13) >> 3) & 0xFF for i in range(1 << 20))
    image.write_bytes(data)
    spare = tmp_path / "spare.img"
    spare.write_bytes(bytes(range(256)) * 2048)
    sock = tmp_path / "qmp.socket"
    argv = base_argv(probe_elf, sock,
                     "-drive", f"id=rootfs,file={image},readonly=on,direct=off",
                     "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0,serial=KATA-ROOT",
                     "-drive", f"id=spare,file={spare},direct=off")  # no -device: registered for hot-plug
    with boot(argv) as vm, Qmp(sock) as qmp:
        info = vm.command("blk 0 info")
        assert probe_value(info, "capacity") == str(len(data) // SECTOR)
        assert "serial=KATA-ROOT" in info and "RO" in probe_value(info, "features")
        out = vm.command("blk 0 read 8 16")
        assert probe_value(out, "crc32") == f"0x{zlib.crc32(data[8 * SECTOR:24 * SECTOR]):08x}"
        assert probe_value(vm.command("blk 1 info"), "capacity") == "0"

        # The spare -drive waits as after blockdev-add: device_add plugs it by its drive id.
        assert qmp.execute("device_add", {"id": "virtio-blk1", "driver": "virtio-blk-mmio", "addr": "0x1",
                                          "drive": "spare"})[1] == {"return": {}}
        deadline = time.monotonic() + 10
        while probe_value(vm.command("blk 1 info"), "capacity") == "0":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        out = vm.command("blk 1 read 0 4")
        assert probe_value(out, "crc32") == f"0x{zlib.crc32(spare.read_bytes()[:4 * SECTOR]):08x}"
        qmp.execute("quit")
        assert vm.wait_exit() == 0


def _frames_both_ways(vm: VmProcess, peer: socket.socket) -> None:
    assert probe_value(vm.command("net 0 info"), "link") == "up"
    vm.command(f"net 0 send {PEER_MAC.hex(':')} 88b5 200 5c")
    frame = recv_from_guest(peer, 0x88B5)
    assert frame[6:12] == bytes.fromhex(GUEST_MAC.replace(":", "")) and frame[14:] == b"\x5c" * 186
    vm.command("net 0 drain")
    out_frame = bytes.fromhex(GUEST_MAC.replace(":", "")) + PEER_MAC + b"\x88\xb6" + os.urandom(500)
    peer.send(out_frame)
    line = vm.command("net 0 recv 5000")[0]
    assert f"crc32=0x{zlib.crc32(out_frame):08x}" in line


def test_tap_by_name(probe_elf, ns, tmp_path):
    ns.add_tap("tap0_kata")
    peer = ns.packet_socket("tap0_kata")
    sock = tmp_path / "qmp.socket"
    argv = base_argv(probe_elf, sock, "-netdev", "tap,id=eth0,ifname=tap0_kata",
                     "-device", f"virtio-net-device,netdev=eth0,id=eth0,mac={GUEST_MAC}")
    with boot(argv, prefix=["ip", "netns", "exec", ns.name]) as vm:
        _frames_both_ways(vm, peer)
    peer.close()


def test_tap_passed_as_an_inherited_descriptor(probe_elf, ns, tmp_path):
    """Kata opens the tap queue itself and passes it at fd 3+ (cmd.ExtraFiles); the VMM runs outside
    the tap's namespace and reaches it only through the descriptor."""
    ns.add_tap("tap0")
    tap = ns.open_tap("tap0")
    peer = ns.packet_socket("tap0")
    sock = tmp_path / "qmp.socket"
    argv = base_argv(probe_elf, sock, "-netdev", f"tap,id=eth0,fds={tap.fd}",
                     "-device", f"virtio-net-device,netdev=eth0,id=eth0,mac={GUEST_MAC},mq=off")
    fd = tap.fd
    try:
        vm = boot(argv, pass_fds=(fd,))
    finally:
        tap.close()  # as Kata closes its copies after the launch
    with vm:
        # The VMM uses the descriptor it was given, under the number it was given.
        assert os.readlink(f"/proc/{vm.pid}/fd/{fd}") == "/dev/net/tun"
        _frames_both_ways(vm, peer)
    peer.close()


def test_inherited_descriptor_that_is_not_a_tap_is_one_sentence(probe_elf, tmp_path):
    r, w = os.pipe()
    try:
        res = subprocess.run(STRATOVIRT + ["-kernel", str(probe_elf), "-qmp", f"unix:{tmp_path / 'q'},server,nowait",
                                           "-netdev", f"tap,id=eth0,fds={r}",
                                           "-device", "virtio-net-device,netdev=eth0"],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, pass_fds=(r,))
    finally:
        os.close(r)
        os.close(w)
    assert res.returncode == 1
    assert res.stderr == f"stratovirt: File descriptor {r} is not a tap device.\n"
    res = run_stratovirt(["-kernel", str(probe_elf), "-qmp", f"unix:{tmp_path / 'q'},server,nowait",
                          "-netdev", "tap,id=eth0,fds=200", "-device", "virtio-net-device,netdev=eth0"])
    assert res.returncode == 1 and res.stderr == (
        "stratovirt: File descriptor 200 was not passed to this VMM (use getfd, or pass it at start-up).\n")
    res = run_stratovirt(["-kernel", str(probe_elf), "-netdev", "tap,id=eth0,fds=1",
                          "-device", "virtio-net-device,netdev=eth0", "-qmp", f"unix:{tmp_path / 'q'}"])
    assert res.returncode == 1 and res.stderr == (  # 0-2 are the VMM's own, never passed to it
        "stratovirt: File descriptor 1 was not passed to this VMM (use getfd, or pass it at start-up).\n")


def test_daemonize_pidfile_and_log_file(probe_elf, tmp_path):
    """Kuasar/openEuler Kata: -daemonize -pidfile -D FILE; the parent exits once the VM runs."""
    sock, pidfile, log = tmp_path / "qmp.sock", tmp_path / "pid", tmp_path / "stratovirt.log"
    res = run_stratovirt(["-name", "sandbox-1", "-uuid", UUID, "-machine", "microvm",
                          "-qmp", f"unix:{sock},server,nowait", "-kernel", str(probe_elf),
                          "-append", "console=hvc0 panic=1", "-smp", "cpus=2", "-m", "1024M",
                          "-pidfile", str(pidfile), "-D", str(log), "-daemonize", "-disable-seccomp"],
                         env={**os.environ, "STRATOVIRT_LOG_LEVEL": "info"})
    assert res.returncode == 0, res.stderr
    assert sock.exists() and pidfile.exists()
    pid = int(pidfile.read_text())
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"pystratovirt" in f.read()
    with Qmp(sock) as qmp:
        cpus = qmp.execute("query-cpus")[1]["return"]
        assert qmp.execute("query-status")[1]["return"]["status"] == "running"
        qmp.execute("quit")
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    assert not pidfile.exists() and not sock.exists()

    lines = log.read_text().splitlines()
    parsed = [LOG_LINE.match(ln) for ln in lines]
    assert all(parsed), [ln for ln, m in zip(lines, parsed, strict=True) if not m]
    assert {int(m.group(1)) for m in parsed} == {pid}
    messages = [m.group(4) for m in parsed]
    first_config = next(i for i, msg in enumerate(messages) if msg.startswith("VmConfig is VmConfig("))
    vcpu_lines = [m for m in parsed if m.group(4).startswith("Vcpu")]
    assert [m.group(4).split()[0] for m in vcpu_lines] == ["Vcpu0", "Vcpu1"]
    assert first_config < messages.index(vcpu_lines[0].group(4))
    # Each "Vcpu<N>" line is logged by that vCPU's own thread: the tid Kata pins.
    assert sorted(int(m.group(2)) for m in vcpu_lines) == sorted(c["thread_id"] for c in cpus)
    assert "dialect=<Dialect.V2: '2.x'>" in messages[first_config] and UUID in messages[first_config]
    assert any(":INFO: exiting with code 0 after host-qmp-quit" in ln for ln in lines)


def test_dash_d_without_value_logs_to_stderr(probe_elf, tmp_path):
    """Kata's bare -D (StratoVirt 2.3: stderr); the next argv element starts with '-'."""
    sock = tmp_path / "qmp.socket"
    proc = subprocess.Popen(STRATOVIRT + ["-kernel", str(probe_elf), "-qmp", f"unix:{sock},server,nowait",
                                          "-D", "-disable-seccomp"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with Qmp(sock) as qmp:
            qmp.execute("quit")
        assert proc.wait(30) == 0
        err = proc.stderr.read().decode()
        assert proc.stdout.read() == b""  # Kata reads stdout: nothing but what the guest prints goes there
        lines = err.splitlines()
        assert lines and all(LOG_LINE.match(ln) for ln in lines), err
        assert any(":INFO: VmConfig is " in ln for ln in lines) and any(":INFO: Vcpu0 " in ln for ln in lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_unsupported_parameter_fails_without_a_traceback():
    """hydropper's test_microvm_with_unsupported_param: non-zero exit, nothing 'panicked'."""
    res = subprocess.run(" ".join(STRATOVIRT) + " --unsupported", shell=True, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
    assert "panicked" not in res.stderr and "Traceback" not in res.stderr
    assert res.stderr == ("stratovirt: Found argument '--unsupported' which wasn't expected, or isn't valid in the "
                          "context. Use '-h' or '-help' to get usage.\n")


def test_kata_argv_with_its_vsock_is_refused_with_one_sentence(probe_elf, tmp_path):
    """Kata's whole argv parses; the vhost-vsock device it always adds cannot be built here (no
    vhost modules): one sentence naming the descriptor, exit 1, no socket left behind."""
    image = tmp_path / "kata.img"
    image.write_bytes(b"\0" * (1 << 20))
    vm_path = tmp_path / "vm"
    vm_path.mkdir()
    not_vsock = os.open("/dev/null", os.O_RDWR)  # what Kata passes is /dev/vhost-vsock, absent here
    try:
        argv = ["-name", "sandbox-x", "-uuid", UUID, "-smp", "1", "-m", "2048", "-kernel", str(probe_elf),
                "-append", "root=/dev/vda1 quiet", "-qmp", f"unix:{vm_path}/qmp.socket,server,nowait", "-D",
                "-disable-seccomp", "-machine", "type=microvm,dump-guest-core=off",
                "-object", "rng-random,id=objrng0,filename=/dev/urandom",
                "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0",
                "-drive", f"id=rootfs,file={image},readonly=on,direct=off",
                "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0",
                "-device", f"vhost-vsock-device,id=vsock-id,guest-cid=3,vhostfd={not_vsock}"]
        res = run_stratovirt(argv, pass_fds=(not_vsock,))
    finally:
        os.close(not_vsock)
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if not LOG_LINE.match(ln)]
    assert errors == [f"stratovirt: vhostfd={not_vsock} is character device 1:3, not a vhost-vsock device "
                      "(VHOST_GET_FEATURES failed: Inappropriate ioctl for device)."], res.stderr
    assert "Traceback" not in res.stderr and not (vm_path / "qmp.socket").exists()


def test_balloon_device_and_its_id(probe_elf, tmp_path):
    """hydropper's -device virtio-balloon-device,deflate-on-oom=true: query-balloon reports all RAM; an
    id= names the QOM path that qom-get answers on (QEMU's /machine/peripheral/<id>)."""
    sock = tmp_path / "qmp.socket"
    argv = base_argv(probe_elf, sock, "-device", "virtio-balloon-device,id=balloon0,deflate-on-oom=true,"
                                                 "free-page-reporting=false")
    with boot(argv) as vm, Qmp(sock) as qmp:
        assert qmp.execute("query-balloon")[1] == {"return": {"actual": 256 << 20}}
        get = {"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval"}
        assert qmp.execute("qom-get", get)[1] == {"return": 0}
        reply = qmp.execute("qom-get", {**get, "path": "/machine/peripheral/balloon"})[1]
        assert reply["error"]["class"] == "DeviceNotFound"
        qmp.execute("quit")
        assert vm.wait_exit() == 0
