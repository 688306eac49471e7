"""The descriptor store: inherited descriptors taken over at start-up, getfd descriptors held by
name, each handed to a backend exactly once, nothing closed that the VMM was not given."""

import fcntl
import json
import os
import subprocess
import sys

import pytest

from pystratovirt.machine.fds import FD_MAX, MAX_NAMED, DescriptorError, Descriptors, parse_reference
from pystratovirt.machine.requests import ErrorClass, MachineError


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


@pytest.fixture
def pipes():
    """``pipes(n)``: n fresh descriptors (read ends of pipes); whatever is left is closed after."""
    opened = []

    def make(n: int = 1) -> list[int]:
        fds = []
        for _ in range(n):
            r, w = os.pipe()
            os.close(w)
            opened.append(r)
            fds.append(r)
        return fds
    yield make
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


# -- inherited descriptors ----------------------------------------------------------------------

CHILD = r"""
import fcntl, json, os, sys
from pystratovirt.machine.fds import claim_inherited, Descriptors
found = claim_inherited()
cloexec = [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in found]
later = os.open(os.devnull, os.O_RDONLY)  # opened by the VMM itself: never claimed
again = claim_inherited()
store = Descriptors.from_process()
second = Descriptors.from_process()
taken = store.take(str(found[0]))
try:
    store.take(later)
    refused = None
except Exception as exc:
    refused = str(exc)
store.close()
print(json.dumps({"found": found, "cloexec": cloexec, "again": again, "inherited": found,
                  "second": second.inherited, "taken": taken, "refused": refused,
                  "later_open": fcntl.fcntl(later, fcntl.F_GETFD) >= 0,
                  "rest_closed": [not os.path.exists(f"/proc/self/fd/{fd}") for fd in found[1:]],
                  "taken_open": os.path.exists(f"/proc/self/fd/{taken}")}))
"""


def test_inherited_descriptors_are_taken_over_once(pipes):
    passed = pipes(3)
    for fd in passed:
        os.set_inheritable(fd, True)
    out = subprocess.run([sys.executable, "-c", CHILD], pass_fds=passed, capture_output=True,
                         text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["found"] == sorted(passed)  # exactly what the parent passed, 0-2 left out
    assert all(result["cloexec"])
    assert result["again"] == result["found"]  # a second claim finds nothing new
    assert result["second"] == []  # a second store owns nothing
    assert result["taken"] == min(passed) and result["taken_open"]  # the backend's now
    assert result["refused"].endswith("was not passed to this VMM (use getfd, or pass it at "
                                      "start-up).")
    assert result["later_open"]
    assert all(result["rest_closed"])  # close() released what was not taken


def test_take_an_inherited_number_once(pipes):
    a, b = pipes(2)
    store = Descriptors([a, b])
    assert store.inherited == sorted([a, b])
    assert store.take(a) == a
    assert store.take(f"tap0:{b}") == b  # StratoVirt's name:number, the last field counts
    with pytest.raises(DescriptorError) as info:
        store.take(str(a))
    assert str(info.value) == f"File descriptor {a} is already used by another backend."
    assert is_open(a) and is_open(b)  # taking never closes
    store.close()
    assert is_open(a) and is_open(b)  # the backends own them now


def test_a_number_the_vmm_was_not_given_is_refused_and_left_alone(pipes):
    (own,) = pipes(1)
    store = Descriptors()
    with pytest.raises(MachineError) as info:
        store.take(own)
    assert info.value.error_class is ErrorClass.GENERIC_ERROR
    assert info.value.desc == (f"File descriptor {own} was not passed to this VMM (use getfd, or "
                               "pass it at start-up).")
    for ref in (0, 1, 2, "27"):
        with pytest.raises(DescriptorError, match="was not passed to this VMM"):
            store.take(ref)
    store.close()
    assert is_open(own)


def test_getfd_names(pipes):
    a, b, c = pipes(3)
    store = Descriptors()
    store.put("fd0", a)
    store.put("vhostfd0", b)
    assert store.names == ["fd0", "vhostfd0"] and store.holds(a)
    assert store.take("fd0") == a  # moves to the backend: the name is gone
    assert store.names == ["vhostfd0"]
    with pytest.raises(DescriptorError) as info:
        store.take("fd0")
    assert str(info.value) == "File descriptor named 'fd0' not found"
    store.put("vhostfd0", c)  # a name in use is re-pointed and its old descriptor closed
    assert not is_open(b) and is_open(c)
    store.put("vhostfd0", c)  # the same descriptor again: nothing to close
    assert is_open(c)
    store.close_named("vhostfd0")
    assert not is_open(c)
    with pytest.raises(DescriptorError) as info:
        store.close_named("vhostfd0")
    assert str(info.value) == "File descriptor named 'vhostfd0' not found"
    assert is_open(a)
    os.close(a)


def test_put_never_leaks_what_it_refuses(pipes):
    store = Descriptors()
    (fd,) = pipes(1)
    with pytest.raises(DescriptorError, match="not starting with a digit"):
        store.put("1abc", fd)
    assert not is_open(fd)
    fds = pipes(MAX_NAMED + 1)
    for i, fd in enumerate(fds[:MAX_NAMED]):
        store.put(f"fd{i}", fd)
    with pytest.raises(DescriptorError) as info:
        store.put("one-too-many", fds[-1])
    assert str(info.value) == (f"Too many file descriptors are held ({MAX_NAMED}); release some "
                               "with closefd first.")
    assert not is_open(fds[-1])
    extra = os.dup(fds[1])
    store.put("fd0", extra)  # re-pointing a name stays possible at the limit
    assert not is_open(fds[0])
    store.close()
    assert not any(is_open(fd) for fd in fds)


def test_close_releases_everything_held_and_is_idempotent(pipes):
    a, b, c = pipes(3)
    store = Descriptors([a, b])
    store.put("x", c)
    taken = store.take(b)
    store.close()
    assert not is_open(a) and not is_open(c) and is_open(taken)
    store.close()
    assert store.inherited == [] and store.names == []


@pytest.mark.parametrize("reference, expected", [
    (3, 3), ("3", 3), ("fd0", "fd0"), ("tap0:5", 5), ("3:4", 4), ("a:fd1", "fd1"),
    (FD_MAX, FD_MAX), ("_x.y-z", "_x.y-z"),
])
def test_parse_reference(reference, expected):
    assert parse_reference(reference) == expected


@pytest.mark.parametrize("reference", [
    "-1", "18446744073709551616", 2**40, -1, str(FD_MAX + 1), "", "a:", "1a", "fd 0", "fd\x00",
    "t\ud800", "٣", True, None, 3.0, "x" * 200,
])
def test_parse_reference_refuses(reference):
    with pytest.raises(DescriptorError) as info:
        parse_reference(reference)
    assert "is not a file descriptor number" in str(info.value)
    assert len(str(info.value)) < 200
