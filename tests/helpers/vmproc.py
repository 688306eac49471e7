"""Run ``stratovirt`` as a real subprocess under KVM, read its serial console, talk QMP to it.

Nothing here is mocked: the VMM process is the one users run, the guest is real, and the socket
is the one a QMP client connects to.
"""

from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

STRATOVIRT = [sys.executable, "-m", "pystratovirt"]


class _Stream:
    """Collects a pipe's output on a thread so tests can wait for text with a timeout."""

    def __init__(self, pipe):
        self.data = bytearray()
        self.cond = threading.Condition()
        self.closed = False
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe) -> None:
        while True:
            chunk = pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(4096)
            with self.cond:
                if not chunk:
                    self.closed = True
                    self.cond.notify_all()
                    return
                self.data += chunk
                self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return self.data.decode(errors="replace")


def vmconfig_entry(config, path: str | Path) -> list[str]:
    """The command that runs a hand-built VmConfig in a process of its own (pickled to ``path``;
    see helpers/run_vmconfig.py), for :class:`VmProcess`'s ``entry``."""
    import pickle
    Path(path).write_bytes(pickle.dumps(config))
    return [sys.executable, "-m", "helpers.run_vmconfig", str(path)]


class VmProcess:
    def __init__(self, args: list[str], *, env: dict | None = None, cwd: str | None = None,
                 prefix: list[str] | None = None, pass_fds: tuple[int, ...] = (),
                 program: list[str] | None = None):
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self.args = args
        self.started = time.monotonic()
        # ``prefix`` runs the VMM under another command, e.g. ``ip netns exec NS``; ``program``
        # replaces the VMM command itself (``ozone ... --``, which starts the VMM, or
        # :func:`vmconfig_entry`, which lives in tests/); ``pass_fds`` are inherited under the
        # same numbers, as Kata passes tap and vhost descriptors.
        if program is not None:  # test helpers it may run live in tests/; the package in the cwd
            tests_dir = str(Path(__file__).resolve().parent.parent)
            paths = (os.getcwd(), tests_dir, full_env.get("PYTHONPATH"))
            full_env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.proc = subprocess.Popen((prefix or []) + (program or STRATOVIRT) + args, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd,
                                     pass_fds=pass_fds)
        self.out = _Stream(self.proc.stdout)
        self.err = _Stream(self.proc.stderr)
        self._pos = 0  # how far command() has consumed the serial output

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- serial ---------------------------------------------------------------------------------
    def serial(self) -> str:
        return self.out.text()

    def wait_for(self, pattern: str, timeout: float = 30.0, *, start: int | None = None) -> re.Match:
        """Wait until the serial output (from ``start``, default the consumed position) matches."""
        return self._wait(pattern, timeout, start)[0]

    def _wait(self, pattern: str, timeout: float, start: int | None) -> tuple[re.Match, str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        begin = self._pos if start is None else start
        with self.out.cond:
            while True:
                text = self.out.data[begin:].decode(errors="replace")
                m = regex.search(text)
                if m:
                    self._pos = begin + len(text[:m.end()].encode())
                    return m, text
                left = deadline - time.monotonic()
                if left <= 0 or (self.out.closed and self.proc.poll() is not None):
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {pattern!r} on the serial console; "
                        f"exit code {self.proc.poll()}\n--- serial (tail) ---\n{text[-3000:]}\n"
                        f"--- stderr (tail) ---\n{self.err.text()[-3000:]}")
                self.out.cond.wait(min(left, 0.5))

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def command(self, line: str, timeout: float = 30.0) -> list[str]:
        """Run one probe-guest command; return its output lines (without the final ``ok``)."""
        start = self._pos
        self.send(line + "\n")
        m, text = self._wait(r"(?m)^(ok|error: [^\r\n]*)\r?\n", timeout, start)
        lines = [ln.rstrip("\r") for ln in text[:m.start()].splitlines() if ln.strip()]
        if m.group(1) != "ok":
            raise AssertionError(f"probe command {line!r} failed: {m.group(1)}; output {lines}")
        return lines

    def command_shell(self, line: str, timeout: float = 60.0) -> list[str]:
        """Run a shell command in a Linux guest; return its output lines (between markers)."""
        tag = f"@@{time.monotonic_ns()}@@"
        self.send(f"echo {tag}B; {line}; echo {tag}E\n")
        self.wait_for(rf"(?m)^{tag}B\r?\n", timeout)
        start = self._pos
        m, text = self._wait(rf"(?m)^{tag}E\r?$", timeout, start)
        return [ln.rstrip("\r") for ln in text[:m.start()].splitlines() if ln.strip()]

    # -- process --------------------------------------------------------------------------------
    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the VMM did not exit within {timeout}s\n--- serial (tail) ---\n"
                                 f"{self.serial()[-2000:]}\n--- stderr ---\n{self.err.text()[-2000:]}") from None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin,):
            try:
                pipe.close()
            except OSError:
                pass
        # Every VMM a test starts runs with its seccomp filters (the default): one that died of
        # SIGSYS made a call its allow-list lacks, whatever the test itself went on to check.
        if self.proc.returncode == -signal.SIGSYS:
            raise AssertionError(f"the VMM was killed by its seccomp filter (SIGSYS): a system call "
                                 f"outside its allow-list\n--- stderr (tail) ---\n{self.err.text()[-2000:]}")

    def __enter__(self) -> VmProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def probe_value(lines: list[str], key: str, *, sep: str = r"[:=] ?", value: str = r".*") -> str:
    """The value in the first of a probe command's reply lines that reads ``key``, ``sep``,
    ``value`` (regular expressions; the probe answers "key: value" or "key=value"), or an
    AssertionError naming what was missing."""
    for ln in lines:
        m = re.match(rf"{key}{sep}({value})", ln)
        if m:
            return m.group(1)
    raise AssertionError(f"no {key} in {lines}")


def vmm_rss(pid: int) -> int:
    """The resident memory of a process, in bytes (``/proc/PID/smaps_rollup``)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss in smaps_rollup")


def run_stratovirt(args: list[str], timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(STRATOVIRT + args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def wait_for_path(path: str | Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def connect_unix(path: str | Path, timeout: float = 30.0) -> socket.socket:
    """A stream socket connected to ``path`` once the VMM listens there: the file exists from
    bind() on, and listen() follows a moment later."""
    wait_for_path(path, timeout)
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Qmp:
    """A raw QMP connection: exact bytes in, parsed messages out."""

    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.sock = connect_unix(path, timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.greeting_line = self.read_line()
        self.greeting = json.loads(self.greeting_line)

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def read(self) -> dict:
        return json.loads(self.read_line())

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_fds(self, data: bytes, fds: list[int]) -> None:
        """Send ``data`` with ``fds`` attached as SCM_RIGHTS (what ``getfd`` expects)."""
        self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])

    def execute(self, command: str, arguments: dict | None = None, **extra) -> tuple[list[dict], dict]:
        """Send a command; return (events received before the reply, the reply)."""
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        msg.update(extra)
        self.send_raw(json.dumps(msg).encode())
        events = []
        while True:
            m = self.read()
            if "event" in m:
                events.append(m)
            else:
                return events, m

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
