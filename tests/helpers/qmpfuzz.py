"""A seeded QMP fuzzer for a live VMM, shared by tests/integration/test_qmp_hardening.py (a few
thousand messages) and bench/qmp_fuzz.py (100,000 and more).

Each generated message knows how many replies it must get, so the runner can check that every
message got exactly its replies, in order, with its own ``id`` where it carried one:

* ``command``: a real command with hostile arguments (any JSON type, NUL, lone surrogates,
  huge and over-long strings, numbers past 2**64), one reply carrying the message's ``id``;
* ``mutated``: a command with one or two bytes replaced by bytes that do not change where the
  message ends (never a bracket, quote, backslash or 0xFF), one reply;
* ``huge``: a command padded past the 64 KiB message limit, one "too long" reply;
* ``nested``: ``[[[...]]]`` or ``{"a":{"a":...}}`` up to 100,000 deep, one reply;
* ``garbage``: random bytes that form one bare token up to a newline, one reply;
* ``truncated``: the start of a command, abandoned with a 0xFF byte, no reply;
* ``fds``: any of the above, or a lone space, sent with SCM_RIGHTS descriptors of odd kinds
  (a pipe, /dev/null, an eventfd, a memfd, an epoll instance, a socket pair end, a directory,
  the same one many times, more than the server takes in one message).

``quit`` is only ever sent with arguments (which it refuses), so the VM outlives the run; no NIC
is configured, so a numeric ``fds`` never names a tap the VM uses, and no interface name the
fuzzer sends is one a developer's tap is likely to have.
"""

from __future__ import annotations

import array
import collections
import json
import os
import random
import select
import socket
import threading
import time
from dataclasses import dataclass, field

MAX_MESSAGE = 65536
FD_NAMES = [f"fz{i}" for i in range(6)]  # getfd names the fuzzer uses (all released at the end)

COMMANDS = ["qmp_capabilities", "query-version", "query-commands", "query-status", "query-cpus",
            "query-hotpluggable-cpus", "stop", "cont", "quit", "blockdev-add", "blockdev-del",
            "netdev_add", "netdev_del", "device_add", "device_del", "balloon", "query-balloon",
            "qom-get", "qom-set", "getfd", "closefd", "no-such-command"]
KEYS = ["id", "value", "addr", "lun", "node-name", "file", "cache", "read-only", "ifname", "fds",
        "vhost", "vhostfds", "driver", "filename", "enable", "fdname", "path", "property",
        "drive", "netdev", "mac", "romfile", "share-rw", "bus", "type", "script", "downscript",
        "queues", "direct", "no-flush", "aio", "locking", "foo"]
STRINGS = ["", "0", "1", "-1", "0x1", "0x", "7", "27", "2147483648", "18446744073709551616",
           "fd0", "fz1", "fz2:3", "3:4", "tapfz9", "t\x00p", "a\ud800", "\udfff", "on", "off",
           "no", "raw", "file", "host_device", "native", "virtio-blk-mmio", "virtio-net-pci",
           "virtio-blk-pci", "/nonexistent/disk", "/dev/null", "/", "..", "drive-0", "net-0",
           "52:54:00:12:34:56", "é" * 9, "/machine/peripheral/balloon", "guest-stats",
           "guest-stats-polling-interval", "x" * 300]
NUMBERS = [0, 1, -1, 3, 7, 255, 2**31 - 1, 2**31, 2**32, 2**40, 2**63, 2**64, 2**64 + 1,
           -(2**70), 1.5, 1e300, -0.0]
PROBE_ID = "fuzz-probe"


@dataclass
class Message:
    kind: str
    data: bytes
    replies: int  # how many replies it must get
    id: str | None = None  # the id its one reply must carry, when known
    fds: list[int] = field(default_factory=list)


class Generator:
    """Seeded message generator; ``odd_fds`` are the descriptors it may pass (owned by caller)."""

    def __init__(self, seed: int, odd_fds: list[int]):
        self.rng = random.Random(seed)
        self.odd_fds = odd_fds
        self.count = 0

    # -- JSON values ------------------------------------------------------------------------------
    def value(self, depth: int = 0):
        r = self.rng.random()
        if r < 0.35:
            return self.rng.choice(STRINGS)
        if r < 0.55:
            return self.rng.choice(NUMBERS)
        if r < 0.62:
            return self.rng.choice([None, True, False])
        if r < 0.7:
            return "".join(chr(self.rng.choice([self.rng.randrange(32, 127),
                                                self.rng.randrange(0x80, 0x2FFF),
                                                self.rng.randrange(0xD800, 0xE000), 0]))
                           for _ in range(self.rng.randrange(12)))
        if r < 0.75:
            return "s" * self.rng.randrange(1000, 20000)
        if depth < 2 and r < 0.88:
            return {self.rng.choice(KEYS): self.value(depth + 1)
                    for _ in range(self.rng.randrange(4))}
        if depth < 2:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(3))]
        return self.rng.choice(STRINGS)

    def command(self) -> dict:
        name = self.rng.choice(COMMANDS)
        args = {self.rng.choice(KEYS): self.value() for _ in range(self.rng.randrange(5))}
        if name == "quit":
            args["foo"] = 1  # refused: the VM must outlive the run
        if name == "getfd" and self.rng.random() < 0.7:
            args = {"fdname": self.rng.choice(FD_NAMES)}
        obj: dict = {"execute": name}
        if args or self.rng.random() < 0.3:
            obj["arguments"] = args
        return obj

    # -- messages ---------------------------------------------------------------------------------
    def next(self) -> Message:
        self.count += 1
        tag = f"f{self.count}"
        r = self.rng.random()
        if r < 0.45:
            message = self._command(tag)
        elif r < 0.6:
            message = self._mutated()
        elif r < 0.63:
            message = self._huge(tag)
        elif r < 0.66:
            message = self._nested()
        elif r < 0.8:
            message = self._garbage()
        elif r < 0.88:
            message = self._truncated()
        else:
            message = self._lone_space()
        if self.rng.random() < 0.1 and message.kind != "lone-space":
            message.fds = self._fds()
        return message

    def _dumps(self, obj) -> bytes:
        # Python's json.dumps writes lone surrogates as \\udXXX escapes: valid JSON text.
        spaced = self.rng.random() < 0.5
        text = json.dumps(obj, separators=(", ", ": ") if spaced else (",", ":"))
        return text.encode() + self.rng.choice([b"", b"\n", b"\r\n"])

    def _command(self, tag: str) -> Message:
        obj = self.command()
        obj["id"] = tag
        data = self._dumps(obj)
        if len(data.rstrip()) > MAX_MESSAGE:
            return Message("huge", data, 1)
        return Message("command", data, 1, tag)

    def _mutated(self) -> Message:
        data = bytearray(self._dumps(self.command()).rstrip())
        if len(data) > MAX_MESSAGE:
            return Message("huge", bytes(data), 1)
        for _ in range(self.rng.randint(1, 2)):
            at = self.rng.randrange(1, len(data) - 1)
            if data[at] in b'{}[]"\\':
                continue
            data[at] = self.rng.choice(b"abcxyz019:,. -+eE\x00\x01\t\x7f\x80\xc3\xe9")
        return Message("mutated", bytes(data) + b"\n", 1)

    def _huge(self, tag: str) -> Message:
        size = self.rng.randrange(MAX_MESSAGE - 100, 3 * MAX_MESSAGE)
        data = json.dumps({"execute": "blockdev-add", "id": tag, "arguments": {
            "node-name": "d", "file": {"filename": "/" + "p" * size}}}).encode()
        if len(data) > MAX_MESSAGE:
            return Message("huge", data, 1)
        return Message("command", data, 1, tag)

    def _nested(self) -> Message:
        n = self.rng.choice([10, 100, 1000, 10000, 100000])
        if self.rng.random() < 0.5:
            return Message("nested", b"[" * n + b"]" * n, 1)
        return Message("nested", b'{"a":' * n + b"1" + b"}" * n, 1)

    def _garbage(self) -> Message:
        raw = self.rng.randbytes(self.rng.randrange(1, 200))
        raw = bytes(b for b in raw if b not in b'{}[]"\\\xff\n')
        return Message("garbage", b"x" + raw + b"\n", 1)

    def _truncated(self) -> Message:
        body = self._dumps(self.command()).rstrip()  # ends with the object's closing brace
        return Message("truncated", body[:self.rng.randrange(1, len(body) - 1)] + b"\xff", 0)

    def _lone_space(self) -> Message:
        return Message("lone-space", b" ", 0, fds=self._fds())

    def _fds(self) -> list[int]:
        r = self.rng.random()
        if r < 0.1:
            return [self.rng.choice(self.odd_fds)] * self.rng.randrange(17, 60)  # over the limit
        return [self.rng.choice(self.odd_fds) for _ in range(self.rng.randrange(1, 4))]


def odd_descriptors() -> list[int]:
    """A pipe, /dev/null, an eventfd, a memfd, an epoll instance, a socket pair end, a directory."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    epoll = select.epoll()
    fds = [r, w, os.open(os.devnull, os.O_RDWR), os.eventfd(0), os.memfd_create("fuzz"),
           os.dup(epoll.fileno()), a.detach(), b.detach(), os.open("/", os.O_RDONLY)]
    epoll.close()
    return fds


@dataclass
class Result:
    sent: int = 0
    replies: int = 0
    events: int = 0
    kinds: collections.Counter = field(default_factory=collections.Counter)
    classes: collections.Counter = field(default_factory=collections.Counter)
    fds_sent: int = 0
    seconds: float = 0.0
    fd_names: set = field(default_factory=set)  # names a getfd succeeded with


ALLOWED = [{"return"}, {"return", "id"}, {"error"}, {"error", "id"}]


def run(sock: socket.socket, messages, line_end: bytes = b"\n", *, timeout: float = 60.0) -> Result:
    """Send ``messages`` (an iterable of Message) on a greeted QMP connection from a sender
    thread, read and check every reply here, then probe with query-status. Raises
    AssertionError on the first reply that is missing, extra, out of order or malformed."""
    result = Result()
    expected: collections.deque = collections.deque()
    cond = threading.Condition()
    done = threading.Event()
    failure: list[BaseException] = []

    def send_all() -> None:
        try:
            for message in messages:
                with cond:
                    expected.append(message)
                    cond.notify()
                if message.fds:
                    # sendmsg may write only part of a long message: the descriptors go with
                    # the first part, the rest follows.
                    n = sock.sendmsg([message.data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", message.fds))])
                    sock.sendall(message.data[n:])
                    result.fds_sent += len(message.fds)
                else:
                    sock.sendall(message.data)
                result.sent += 1
                result.kinds[message.kind] += 1
            probe = Message("probe", b'\xff{"execute":"query-status","id":"%s"}\n'
                            % PROBE_ID.encode(), 1, PROBE_ID)
            with cond:
                expected.append(probe)
                cond.notify()
            sock.sendall(probe.data)
        except BaseException as exc:  # hand it to the reader
            failure.append(exc)
        finally:
            done.set()

    start = time.monotonic()
    sock.settimeout(timeout)
    sender = threading.Thread(target=send_all, name="qmp-fuzz-sender", daemon=True)
    sender.start()
    buf = b""

    def next_line() -> bytes:
        nonlocal buf
        while b"\n" not in buf:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise AssertionError(f"the VMM hung up after {result.replies} replies")
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        assert line.endswith(line_end[:-1]), line[-50:]
        return line

    while True:
        with cond:
            while not expected and not done.is_set():
                cond.wait(0.1)
                if failure:
                    raise failure[0]
            if not expected:
                break
            message = expected.popleft()
        for _ in range(message.replies):
            while True:
                msg = json.loads(next_line())
                assert isinstance(msg, dict), msg
                if "event" in msg:
                    assert set(msg) == {"event", "data", "timestamp"}, msg
                    assert msg["event"] != "SHUTDOWN", msg
                    result.events += 1
                    continue
                break
            assert set(msg) in ALLOWED, (message.kind, message.data[:200], msg)
            if "error" in msg:
                assert list(msg["error"]) == ["class", "desc"], msg
                assert not msg["error"]["desc"].startswith("Internal error"), \
                    (message.kind, message.data[:300], msg)
                result.classes[msg["error"]["class"]] += 1
            else:
                result.classes["return"] += 1
                _note_getfd(message, result.fd_names)
            assert msg.get("id") == message.id or message.id is None, \
                (message.kind, message.data[:200], msg)
            result.replies += 1
        if message.kind == "probe":
            assert msg["return"]["status"] in ("running", "paused"), msg
            break
    sender.join(timeout)
    if failure:
        raise failure[0]
    result.seconds = time.monotonic() - start
    return result


def _note_getfd(message: Message, names: set) -> None:
    """Remember the name of a getfd that succeeded (mutated ones included)."""
    try:
        obj = json.loads(message.data)
        if obj.get("execute") == "getfd":
            names.add(obj["arguments"]["fdname"])
    except (ValueError, AttributeError, KeyError, TypeError):
        pass


def release_names(send_command, result: Result) -> None:
    """closefd every name a getfd of the run succeeded with (``send_command(dict) -> reply``)."""
    for name in sorted(set(FD_NAMES) | result.fd_names):
        send_command({"execute": "closefd", "arguments": {"fdname": name}})
