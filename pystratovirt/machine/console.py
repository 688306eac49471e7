"""The host end of the guest's serial port: ``-serial stdio`` and its terminal handling.

Guest output goes to our stdout; our stdin feeds the UART's receive FIFO from the control loop.
When stdin is a terminal it is put in raw mode (so Ctrl-C and line editing reach the guest) and
restored on every exit path: normal return, exceptions, SIGTERM/SIGINT handled by the machine,
and ``atexit`` as a last resort. As in QEMU, Ctrl-A x ends the VMM from a raw terminal.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable

from ..devices.serial import Serial
from ..util.eventloop import EPOLLIN, EventLoop
from ..util.terminal import RawTerminal

log = logging.getLogger(__name__)

CTRL_A = 0x01
RETRY_FULL_FIFO = 0.01  # seconds to wait before offering input again when the guest is not reading


class StdioConsole:
    def __init__(self, loop: EventLoop, in_fd: int = 0, out_fd: int = 1,
                 on_escape: Callable[[], None] | None = None):
        self._loop = loop
        self._in = in_fd
        self._out = out_fd
        self._on_escape = on_escape
        self._serial: Serial | None = None
        self._terminal = RawTerminal(in_fd)
        self._escape = False
        self._pending = b""
        self._registered = False

    # -- output ---------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Sink for the UART (called on vCPU threads)."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._out, view)
            except BlockingIOError:
                # stdin and stdout often share one open file description (a terminal), so our
                # non-blocking stdin makes stdout non-blocking too: wait until it can take more.
                select.select([], [self._out], [], 1.0)
                continue
            except OSError:
                return  # nobody is reading our output any more; the guest keeps running
            view = view[n:]

    # -- input ----------------------------------------------------------------------------------
    def attach(self, serial: Serial) -> None:
        self._serial = serial
        self._terminal.enter()
        os.set_blocking(self._in, False)
        self._register()

    def _register(self) -> None:
        if not self._registered:
            try:
                self._loop.register(self._in, EPOLLIN, self._on_input)
            except PermissionError:
                # A regular file (or /dev/null) cannot be polled: read it all once.
                self._drain_file()
                return
            self._registered = True

    def _unregister(self) -> None:
        if self._registered:
            self._loop.unregister(self._in)
            self._registered = False

    def _drain_file(self) -> None:
        try:
            data = os.read(self._in, 1 << 16)
        except OSError:
            return
        if data:
            self._pending += data
            self._offer()

    def _on_input(self, mask: int) -> None:
        try:
            data = os.read(self._in, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._unregister()  # EOF: the guest keeps running without input
            return
        if self._terminal.raw:
            data = self._filter_escape(data)
        self._pending += data
        self._offer()

    def _offer(self) -> None:
        assert self._serial is not None
        taken = self._serial.feed(self._pending)
        self._pending = self._pending[taken:]
        if self._pending:
            # The guest's FIFO is full: stop reading stdin until it has drained.
            self._unregister()
            self._loop.call_later(RETRY_FULL_FIFO, self._retry)

    def _retry(self) -> None:
        self._offer()
        if not self._pending:
            self._register()

    def _filter_escape(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    log.info("Ctrl-A x on the console: quitting")
                    if self._on_escape:
                        self._on_escape()
                    continue
                if b != CTRL_A:
                    out.append(CTRL_A)
                out.append(b)
            elif b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        return bytes(out)

    # -- teardown -------------------------------------------------------------------------------
    def restore_terminal(self) -> None:
        self._terminal.restore()

    def close(self) -> None:
        self._unregister()
        try:
            os.set_blocking(self._in, True)
        except OSError:
            pass
        self.restore_terminal()
