"""StratoVirt's log line format: the prefix Kata's ':INFO: '/':WARN: ' sort and hydropper's timestamp
regex (reference §1.3, §4.3 test_microvm_quickstart) read."""

from __future__ import annotations

import logging
import os
import re
import threading
import time

import pytest

from pystratovirt.util.logformat import StratoVirtFormatter, install_ns_clock, level_name, source_file, timestamp

# hydropper: re.match(r'(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}.\d{9})', line); StratoVirt's whole prefix:
LINE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}): \[(\d+)\]\[(\d+)\]\[([^:\]]+): (\d+)\]:"
                  r"(ERROR|WARN|INFO|DEBUG|TRACE): (.*)$")


def record(msg, *args, level=logging.INFO, exc_info=None, pathname=None):
    rec = logging.LogRecord("pystratovirt.test", level, pathname or __file__, 42, msg, args, exc_info)
    rec.created_ns = 1_700_000_000_123_456_789
    return rec


def test_line_layout():
    line = StratoVirtFormatter().format(record("VmConfig is %s", "X"))
    m = LINE.match(line)
    assert m, line
    assert m.group(1) == timestamp(1_700_000_000_123_456_789)
    assert m.group(1).endswith(".123456789")
    assert int(m.group(2)) == os.getpid() and int(m.group(3)) == threading.get_native_id()
    assert m.group(4) == "tests/util/test_logformat.py" and m.group(5) == "42"
    assert m.group(6) == "INFO" and m.group(7) == "VmConfig is X"
    assert ":INFO: VmConfig" in line  # what hydropper looks for


def test_timestamp_is_local_time_with_nanoseconds():
    ns = 1_700_000_000_000_000_007
    assert timestamp(ns) == time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(1_700_000_000)) + ".000000007"


@pytest.mark.parametrize("level, name", [
    (logging.DEBUG, "DEBUG"), (logging.INFO, "INFO"), (logging.WARNING, "WARN"), (logging.ERROR, "ERROR"),
    (logging.CRITICAL, "ERROR"), (5, "TRACE"), (25, "INFO"), (35, "WARN"),
])
def test_level_names_are_rusts(level, name):
    assert level_name(level) == name
    assert f":{name}: " in StratoVirtFormatter().format(record("m", level=level))


def test_kata_sorts_lines_by_level():
    """Kata logs a VMM line as info if it matches ':INFO: ', warn if ':WARN: ', else as an error."""
    fmt = StratoVirtFormatter()
    assert ":INFO: " in fmt.format(record("started"))
    assert ":WARN: " in fmt.format(record("odd", level=logging.WARNING))


def test_every_line_of_a_multi_line_record_has_the_prefix():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        rec = record("first\nsecond", level=logging.ERROR, exc_info=sys.exc_info())
    lines = StratoVirtFormatter().format(rec).split("\n")
    assert len(lines) > 4
    assert all(LINE.match(ln) for ln in lines), lines
    assert lines[0].endswith(":ERROR: first") and lines[1].endswith(":ERROR: second")
    assert lines[-1].endswith("ValueError: boom")
    raw = StratoVirtFormatter(line_end="\r\n").format(record("a\nb"))
    assert raw.count("\r\n") == 1


def test_source_path_outside_the_tree_stays_absolute():
    assert source_file("/usr/lib/python3/logging/__init__.py") == "/usr/lib/python3/logging/__init__.py"
    line = StratoVirtFormatter().format(record("m", pathname="/opt/x.py"))
    assert "[/opt/x.py: 42]" in line


def test_ns_clock_stamps_records_once():
    old = logging.getLogRecordFactory()
    try:
        install_ns_clock()
        install_ns_clock()  # idempotent: one wrapper
        before = time.time_ns()
        rec = logging.getLogger("x").makeRecord("x", logging.INFO, __file__, 1, "m", (), None)
        assert before <= rec.created_ns <= time.time_ns()
        assert logging.getLogRecordFactory().stamps_ns
    finally:
        logging.setLogRecordFactory(old)
