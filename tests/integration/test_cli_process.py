"""The stratovirt process as a user runs it: terminal handling, daemon mode, pidfile, logging."""

from __future__ import annotations

import os
import pty
import subprocess
import termios
import time

import pytest

from helpers.vmproc import STRATOVIRT, Qmp, run_stratovirt, wait_for_path

pytestmark = pytest.mark.kvm


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not seen; got {data[-500:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


class _PtyVm:
    """The VMM with ``-serial stdio`` on a pseudo-terminal, as when a user runs it in a shell."""

    def __init__(self, probe_elf):
        self.master, self.slave = pty.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(STRATOVIRT + ["-kernel", str(probe_elf), "-serial", "stdio"],
                                     stdin=self.slave, stdout=self.slave, stderr=subprocess.PIPE)
        _read_until(self.master, b"ready", 60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)
        os.close(self.slave)


def test_serial_stdio_raw_terminal_is_restored(probe_elf):
    with _PtyVm(probe_elf) as vm:
        during = termios.tcgetattr(vm.slave)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO  # raw mode
        # Ctrl-C goes to the guest as a byte, not to the VMM as SIGINT.
        os.write(vm.master, b"\x03echo still here\r")
        _read_until(vm.master, b"still here", 30)
        assert vm.proc.poll() is None
        os.write(vm.master, b"reboot\r")
        assert vm.proc.wait(30) == 0
        assert termios.tcgetattr(vm.slave) == vm.before


def test_ctrl_a_x_quits_and_restores_terminal(probe_elf):
    with _PtyVm(probe_elf) as vm:
        os.write(vm.master, b"\x01x")
        assert vm.proc.wait(30) == 0
        assert termios.tcgetattr(vm.slave) == vm.before


def test_daemonize_with_pidfile(probe_elf, tmp_path):
    sock, pidfile, log = tmp_path / "vm.sock", tmp_path / "vm.pid", tmp_path / "vm.log"
    res = run_stratovirt(["-kernel", str(probe_elf), "-daemonize", "-pidfile", str(pidfile),
                          "-api-channel", f"unix:{sock}", "-D", str(log)])
    assert res.returncode == 0, res.stderr
    # The parent returns once the VM runs: socket and pidfile exist already.
    assert sock.exists() and pidfile.exists()
    pid = int(pidfile.read_text())
    assert os.path.exists(f"/proc/{pid}")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"pystratovirt" in f.read()
    with Qmp(sock) as qmp:
        assert qmp.execute("query-status")[1]["return"]["status"] == "running"
        qmp.execute("quit")
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    assert not pidfile.exists() and not sock.exists()
    assert "host-qmp-quit" in log.read_text()


def test_daemonize_reports_startup_errors(tmp_path):
    junk = tmp_path / "kernel"
    junk.write_bytes(b"\x7fELF" + b"\0" * 10)
    res = run_stratovirt(["-kernel", str(junk), "-daemonize", "-pidfile", str(tmp_path / "p")])
    assert res.returncode == 1
    assert res.stderr.startswith("stratovirt: ") and "Traceback" not in res.stderr
    assert not (tmp_path / "p").exists()


def test_existing_pidfile_refused(probe_elf, tmp_path):
    pidfile = tmp_path / "vm.pid"
    pidfile.write_text("1\n")
    res = run_stratovirt(["-kernel", str(probe_elf), "-daemonize", "-pidfile", str(pidfile)])
    assert res.returncode == 1
    assert "Pidfile path is existed yet." in res.stderr
    assert pidfile.read_text() == "1\n"


def test_log_file_and_level(probe_elf, tmp_path):
    log = tmp_path / "vm.log"
    sock = tmp_path / "vm.sock"
    proc = subprocess.Popen(STRATOVIRT + ["-kernel", str(probe_elf), "-D", str(log),
                                          "-api-channel", f"unix:{sock}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_path(sock)
        with Qmp(sock) as qmp:
            qmp.execute("quit")
        assert proc.wait(30) == 0
        text = log.read_text()
        assert "started with 1 vCPU" in text and "host-qmp-quit" in text
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()


def test_help_and_version():
    res = run_stratovirt(["-help"])
    assert res.returncode == 0 and "-api-channel" in res.stdout
    res = run_stratovirt(["-V"])
    assert res.returncode == 0 and res.stdout.strip()


def test_console_script_installed():
    import shutil
    exe = shutil.which("stratovirt")
    assert exe is not None
    res = subprocess.run([exe, "--bogus"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr


def test_sighup_shuts_down_like_sigterm(probe_elf, tmp_path):
    # Before: SIGHUP's default action killed the VMM at once, with no SHUTDOWN event, and left
    # the socket file behind.
    import signal
    sock = tmp_path / "vm.sock"
    proc = subprocess.Popen(STRATOVIRT + ["-kernel", str(probe_elf), "-api-channel", f"unix:{sock}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with Qmp(sock) as qmp:
            assert qmp.execute("query-status")[1]["return"]["status"] == "running"
            proc.send_signal(signal.SIGHUP)
            event = qmp.read()
            assert (event["event"], event["data"]) == ("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        assert proc.wait(30) == 0
        assert not sock.exists()
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
