"""StratoVirt's log line format, for the standard ``logging`` module.

Owns the look of one log line: StratoVirt's (``util/src/logger.rs``, v0.x and 2.x alike)::

    2023-09-11T10:00:00.123456789: [4242][4243][pystratovirt/machine/microvm.py: 131]:INFO: VmConfig is ...

local time with nanoseconds, process id, the *kernel* thread id of the thread that logged, the
source file (relative to the package's parent directory, as Rust's ``file!()`` is relative to the
crate) and line, then the level as Rust's ``log`` crate names it (ERROR, WARN, INFO, DEBUG).
Kata Containers sorts the VMM's lines by ``:INFO: `` / ``:WARN: `` and counts everything else as
an error; hydropper parses the timestamp at the start of each line. So a record whose text spans
several lines (a message with newlines, a traceback) becomes several lines with the same prefix:
every line of the log parses.

``created_ns`` (installed by :func:`install_ns_clock`) gives the nanoseconds; without it the
float ``created`` is used, whose last digits are not significant.
"""

from __future__ import annotations

import logging
import os
import threading
import time

LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN", logging.ERROR: "ERROR",
               logging.CRITICAL: "ERROR"}

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def level_name(levelno: int) -> str:
    """Rust's name for a level; in-between levels round down (15 is DEBUG, 35 WARN)."""
    for number in sorted(LEVEL_NAMES, reverse=True):
        if levelno >= number:
            return LEVEL_NAMES[number]
    return "TRACE"


def timestamp(ns: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`` in local time (StratoVirt uses localtime_r)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds)) + f".{frac:09d}"


def source_file(pathname: str) -> str:
    """The logging module's path relative to the directory holding the package."""
    try:
        rel = os.path.relpath(pathname, _ROOT)
    except ValueError:
        return pathname
    return pathname if rel.startswith("..") else rel


class StratoVirtFormatter(logging.Formatter):
    """Formats a record as StratoVirt's line(s); see the module docstring. ``line_end`` joins the
    lines of a multi-line record (a terminal in raw mode needs "\r\n")."""

    def __init__(self, line_end: str = "\n"):
        super().__init__()
        self.line_end = line_end

    def format(self, record: logging.LogRecord) -> str:
        ns = getattr(record, "created_ns", None)
        if ns is None:
            ns = int(record.created * 1_000_000_000)
        # format() runs on the thread that logged (no queue handler), so this is its kernel tid.
        prefix = (f"{timestamp(ns)}: [{record.process or os.getpid()}][{threading.get_native_id()}]"
                  f"[{source_file(record.pathname)}: {record.lineno}]:{level_name(record.levelno)}: ")
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return self.line_end.join(prefix + line for line in text.split("\n"))


def install_ns_clock() -> None:
    """Stamp every new LogRecord with ``created_ns`` (time.time_ns()), once per process."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "stamps_ns", False):
        return

    def make_record(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.created_ns = time.time_ns()
        return record

    make_record.stamps_ns = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)
