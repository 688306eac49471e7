"""The probe guest's command console over hvc0: the host end of a virtio-console socket chardev.

Booted with ``console=hvc0`` and a virtio console (Kata's debug argv, hydropper's argv), the probe
also takes its commands there and mirrors everything it prints (see
``pystratovirt/guest/probe/virtio_console.c``). Tests whose command line has no ``-serial stdio``
(a daemonized VM, Kata's stdout reader) drive the guest through this, as a user would through
Linux's hvc0.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from helpers.vmproc import connect_unix

_RESULT = re.compile(rb"(?m)^(ok|error: [^\n]*)\n")


class HvcConsole:
    """A client of the console socket: ``command(line)`` runs one probe command."""

    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.sock = connect_unix(path, timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def _read_until(self, regex: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.buf)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"hvc0: timed out after {timeout}s; got {self.buf[-2000:]!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"hvc0: the console socket closed; got {self.buf[-2000:]!r}")
            self.buf += chunk

    def command(self, line: str, timeout: float = 30.0) -> list[str]:
        """Run one probe command; its output lines (without the final ``ok``). What the probe
        printed before (its boot report, if this client was early) is skipped."""
        self.buf = b""
        self.sock.sendall(line.encode() + b"\n")
        m = self._read_until(_RESULT, timeout)
        out = self.buf[:m.start()].decode(errors="replace")
        self.buf = self.buf[m.end():]
        lines = [ln.rstrip("\r") for ln in out.splitlines() if ln.strip()]
        if m.group(1) != b"ok":
            raise AssertionError(f"probe command {line!r} failed on hvc0: {m.group(1).decode()}; output {lines}")
        return lines

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the probe answers on hvc0 (it may still be booting when the socket
        appears). Asks again each second; once one answer came, one last ``echo`` is waited
        for, so the answers to the earlier tries are all in and cannot be mistaken for the
        next command's."""
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            tries += 1
            self.sock.sendall(f"echo hvc-try-{tries}\n".encode())
            try:
                self._read_until(re.compile(rb"(?m)^hvc-try-\d+\nok\n"), 1.0)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        self.sock.sendall(b"echo hvc-ready\n")
        m = self._read_until(re.compile(rb"(?m)^hvc-ready\nok\n"), max(deadline - time.monotonic(), 10.0))
        self.buf = self.buf[m.end():]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HvcConsole:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
