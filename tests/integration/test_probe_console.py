"""virtio-console driven by the probe guest under real KVM, on real chardevs: the early command
line's socket console (``-chardev id=,path=``) with real clients, and a file and a pty from a
hand-built VmConfig (what the 2.x ``-chardev file|pty`` will give)."""

from __future__ import annotations

import os
import re
import socket
import stat
import time
import zlib

import pytest

from helpers.vmproc import Qmp, VmProcess, run_stratovirt, vmconfig_entry, wait_for_path
from pystratovirt.machine.vmconfig import BootSource, ChardevConfig, ConsoleConfig, SerialConfig, VmConfig

pytestmark = pytest.mark.kvm


def boot_socket_console(probe_elf, tmp_path, *extra) -> tuple[VmProcess, str]:
    sock = str(tmp_path / "console.sock")
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-D", "-m", "256M",
                    "-chardev", f"id=charconsole0,path={sock}", *extra])
    vm.wait_for(r"(?m)^ready\r?$", 60)
    return vm, sock


def connect(path: str, timeout: float = 10) -> socket.socket:
    wait_for_path(path)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(timeout)
    c.connect(path)
    return c


def recv_until(sock: socket.socket, marker: bytes, timeout: float = 10) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        out += sock.recv(65536)
    return out


def boot_vmconfig(probe_elf, tmp_path, **kw) -> VmProcess:
    cfg = VmConfig(boot=BootSource(str(probe_elf)), serial=SerialConfig(stdio=True), log_file="", **kw)
    vm = VmProcess([], program=vmconfig_entry(cfg, tmp_path / "vm.pickle"))
    vm.wait_for(r"(?m)^ready\r?$", 60)
    return vm


def test_socket_console_both_ways(probe_elf, tmp_path):
    vm, sock = boot_socket_console(probe_elf, tmp_path)
    with vm:
        assert re.search(r"virtio: \d+ base=0x[0-9a-f]+ irq=\d+ id=3 \(console\)", vm.serial())
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        info = " ".join(vm.command("console info"))
        assert "MULTIPORT" not in info.split("offered:")[1]   # port 0 only
        client = connect(sock)
        time.sleep(0.2)   # the VMM accepts on its I/O thread
        vm.command("console write hello from the guest")
        assert recv_until(client, b"\n") == b"hello from the guest\n"

        client.sendall(b"hello from the host\r\n")
        assert "console: line 19 bytes: hello from the host" in vm.command("console read 5000")

        # More than the guest's buffers hold: held back by the device, then all of it, in order.
        data = os.urandom(8192)
        client.sendall(data)
        time.sleep(0.5)
        out = " ".join(vm.command("console recv 8192 20000", timeout=60))
        assert f"bytes=8192 crc32=0x{zlib.crc32(data):08x}" in out
        client.close()


def test_output_without_a_reader_never_blocks_the_guest(probe_elf, tmp_path):
    vm, sock = boot_socket_console(probe_elf, tmp_path, "-api-channel", f"unix:{tmp_path / 'qmp.sock'}")
    with vm:
        # No client at all: output is dropped.
        assert "bytes=65536" in " ".join(vm.command("console flood 65536", timeout=60))
        # A client that never reads: the guest still gets through 4 MiB, and the VMM answers.
        client = connect(sock)
        time.sleep(0.2)
        out = " ".join(vm.command("console flood 4194304", timeout=300))
        assert "bytes=4194304" in out
        with Qmp(tmp_path / "qmp.sock") as qmp:
            assert qmp.execute("query-status")[1]["return"]["status"] == "running"
        assert vm.command("echo still here") == ["still here"]
        # The slow client reads at last: what was buffered arrives, then fresh output.
        client.settimeout(2)
        got = b""
        try:
            while True:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
        assert 0 < len(got) < 4194304
        vm.command("console write after the flood")
        assert recv_until(client, b"after the flood\n").endswith(b"after the flood\n")
        client.close()


def test_reconnect_and_socket_removed_at_exit(probe_elf, tmp_path):
    vm, sock = boot_socket_console(probe_elf, tmp_path, "-api-channel", f"unix:{tmp_path / 'qmp.sock'}")
    with vm:
        first = connect(sock)
        time.sleep(0.2)
        vm.command("console write one")
        assert recv_until(first, b"\n") == b"one\n"
        first.close()
        second = connect(sock)
        time.sleep(0.3)
        vm.command("console write two")
        assert recv_until(second, b"\n") == b"two\n"
        with Qmp(tmp_path / "qmp.sock") as qmp:
            qmp.execute("quit")
        assert vm.wait_exit(30) == 0
        second.close()
    assert not os.path.exists(sock)


def test_file_chardev(probe_elf, tmp_path):
    log = tmp_path / "console.log"
    log.write_text("previous boot\n")
    vm = boot_vmconfig(probe_elf, tmp_path, chardevs=[ChardevConfig("charlog", "file", str(log))],
                       consoles=[ConsoleConfig("console0", "charlog")])
    with vm:
        vm.command("console write first line")
        vm.command("console write second line")
        assert "console: partial 0 bytes:" in " ".join(vm.command("console read 200"))  # no input
        deadline = time.monotonic() + 5
        while "second line" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert log.read_text() == "previous boot\nfirst line\nsecond line\n"


def test_pty_chardev(probe_elf, tmp_path):
    vm = boot_vmconfig(probe_elf, tmp_path, chardevs=[ChardevConfig("charpty", "pty")],
                       consoles=[ConsoleConfig("console0", "charpty")])
    with vm:
        m = re.search(r"char device redirected to (/dev/pts/\d+) \(label charpty\)", vm.err.text())
        assert m, vm.err.text()
        fd = os.open(m.group(1), os.O_RDWR | os.O_NOCTTY)
        try:
            vm.command("console write over the pty")
            assert os.read(fd, 100) == b"over the pty\n"
            os.write(fd, b"typed on the pty\n")
            assert "console: line 16 bytes: typed on the pty" in vm.command("console read 5000")
        finally:
            os.close(fd)


@pytest.mark.parametrize("kw, message", [
    ({"chardevs": [ChardevConfig("c", "pty")], "consoles": [ConsoleConfig("con", "c", nr=1)]},
     "Console 'con' asks for port nr=1: only port 0 is supported (one console per virtio-console "
     "device, no multiport)."),
    ({"chardevs": [ChardevConfig("c", "stdio")], "consoles": [ConsoleConfig("con", "c")],
      "serial": SerialConfig(stdio=True)},
     "Chardev 'c' and -serial both want stdio; only one can have it."),
    ({"consoles": [ConsoleConfig("con", "nope")]},
     "Console 'con' names chardev 'nope', which is not defined."),
])
def test_consoles_the_machine_refuses(probe_elf, tmp_path, kw, message):
    kw.setdefault("serial", None)
    cfg = VmConfig(boot=BootSource(str(probe_elf)), **kw)
    vm = VmProcess([], program=vmconfig_entry(cfg, tmp_path / "vm.pickle"))
    with vm:
        assert vm.wait_exit(60) == 1
    assert vm.err.text().strip() == f"stratovirt: {message}"


def test_too_many_devices_for_the_windows(probe_elf, tmp_path):
    result = run_stratovirt(["-kernel", str(probe_elf), "-balloon", "deflate-on-oom=true",
                             "-rng", "random_file=/dev/urandom",
                             "-chardev", f"id=a,path={tmp_path / 'a.sock'}",
                             "-chardev", f"id=b,path={tmp_path / 'b.sock'}"])
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "stratovirt: Too many devices: besides the disk and net slots the micro-VM has room for 3 (its "
        "virtio-mmio IRQs are 5-15), but 4 are configured (a balloon, an rng, console 'a', console 'b').")
    assert not os.path.exists(tmp_path / "a.sock")


def test_a_failing_console_leaves_no_socket_behind(probe_elf, tmp_path):
    """The first console's socket is created, the second chardev fails: the VMM removes the first."""
    cfg = VmConfig(boot=BootSource(str(probe_elf)),
                   chardevs=[ChardevConfig("a", "socket", str(tmp_path / "a.sock")),
                             ChardevConfig("b", "file", str(tmp_path / "no-such-dir" / "b.log"))],
                   consoles=[ConsoleConfig("ca", "a"), ConsoleConfig("cb", "b")])
    vm = VmProcess([], program=vmconfig_entry(cfg, tmp_path / "vm.pickle"))
    with vm:
        assert vm.wait_exit(60) == 1
    assert vm.err.text().strip() == (f"stratovirt: Cannot open the file '{tmp_path}/no-such-dir/b.log' of "
                                     "chardev 'b': No such file or directory.")
    assert not os.path.exists(tmp_path / "a.sock")


def test_hvc0_is_a_command_console_too(probe_elf, tmp_path):
    """With console=hvc0 (Kata's debug argv, hydropper's), the probe takes commands on the virtio
    console and mirrors all it prints there, so a VM with no serial on stdio can be driven."""
    from helpers.hvc import HvcConsole
    con, sock = tmp_path / "console.sock", tmp_path / "qmp.sock"
    vm = VmProcess(["-kernel", str(probe_elf), "-append", "console=hvc0", "-m", "256",
                    "-qmp", f"unix:{sock},server,nowait", "-device", "virtio-serial-device,id=virtio-serial0",
                    "-chardev", f"socket,id=charconsole0,path={con},server,nowait",
                    "-device", "virtconsole,chardev=charconsole0,id=virtio-console0,nr=0"])
    with vm, HvcConsole(con) as hvc:
        hvc.wait_ready()
        assert hvc.command("echo over hvc0") == ["over hvc0"]
        assert any(ln.startswith("cmdline: console=hvc0") for ln in hvc.command("cmdline"))
        assert hvc.command("cpus")[-1] == "cpus online: 1"
        # An unknown command is reported there too; a blank line is nothing.
        hvc.sock.sendall(b"\n")
        with pytest.raises(AssertionError, match="unknown command nosuch"):
            hvc.command("nosuch")
        assert vm.serial() == ""   # no -serial: the UART's output goes nowhere
        with Qmp(sock) as qmp:
            qmp.execute("quit")
        assert vm.wait_exit() == 0
