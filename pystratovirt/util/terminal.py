"""Raw mode on the VMM's own terminal, and getting the terminal back on every way out.

``-serial stdio`` and a stdio chardev hand the user's keystrokes to the guest, so the terminal
goes raw (no line editing; with ``keep_signals`` Ctrl-C still reaches the VMM as SIGINT). The
saved settings come back on :meth:`RawTerminal.restore`, which the owner calls when it closes and
``atexit`` calls as a last resort; a descriptor that is not a terminal is left alone.
"""

from __future__ import annotations

import atexit
import os
import termios
import tty
from typing import Any


class RawTerminal:
    def __init__(self, fd: int):
        self.fd = fd
        self._saved: list[Any] | None = None  # what termios.tcgetattr gave

    def enter(self, *, keep_signals: bool = False) -> None:
        """Make ``fd`` raw if it is a terminal (raises termios.error/OSError if that fails)."""
        if not os.isatty(self.fd):
            return
        self._saved = termios.tcgetattr(self.fd)
        atexit.register(self.restore)
        tty.setraw(self.fd)
        if keep_signals:
            attrs = termios.tcgetattr(self.fd)
            attrs[3] |= termios.ISIG
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    @property
    def raw(self) -> bool:
        return self._saved is not None

    def restore(self) -> None:
        """Put the saved settings back (idempotent; a terminal that went away is ignored)."""
        if self._saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSAFLUSH, self._saved)
            except termios.error:
                pass
            self._saved = None
