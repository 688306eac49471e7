"""Splitting a QMP byte stream into messages, with bounded memory and a way back from garbage.

QMP has no framing of its own: a message ends where its top-level JSON value ends. Clients send
commands with or without a newline (hydropper sends none), several per write, or one split over
many writes, so this module tracks just enough JSON lexical state (bracket depth, inside a string,
after a backslash) to find where each top-level value ends, without parsing it. Scanning works
on raw bytes: every byte that matters to JSON's structure is ASCII, and no byte of a multi-byte
UTF-8 sequence is, so there is no need to decode first.

Rules, chosen so that hostile input costs bounded memory and cannot smuggle a nested object out
as a command of its own:

* A value starting with ``{`` or ``[`` ends at its matching closing bracket; a top-level string
  at its closing quote. Anything else (a bare number, ``true``, garbage) runs to the next newline,
  ``{``, ``[`` or 0xFF, so a line of garbage earns one error reply, not one per byte.
* A message longer than ``limit`` bytes is reported once (:data:`TOO_LONG`) as soon as it crosses
  the limit, and the rest of it is skipped while the lexical state is still tracked. Dropping the
  buffer and re-parsing from the middle would instead execute whatever object happened to be
  nested inside the long message.
* A 0xFF byte (never valid in UTF-8) silently abandons any partial message: a client that lost
  track (e.g. after an unclosed ``{``) can resynchronize without reconnecting, as in QEMU.
"""

from __future__ import annotations

import re

from .schema import MAX_MESSAGE


class TooLong:
    """The type of :data:`TOO_LONG` (its one instance)."""

    def __repr__(self) -> str:
        return "TOO_LONG"


#: Returned by :meth:`JsonSplitter.feed` in place of a message that exceeded the limit.
TOO_LONG = TooLong()

_BETWEEN = re.compile(rb"[ \t\r\n\xff]*")
# Runs of brackets are taken whole, so a wall of "[[[[" costs one step, not one per byte.
_IN_NEST = re.compile(rb'[{\[]+|[}\]]+|["\xff]')
_IN_STRING = re.compile(rb'["\\\xff]')
_TOKEN_END = re.compile(rb"[\n{\[\xff]")

_NEST, _STRING, _TOKEN = "nest", "string", "token"
_RESET = 0xFF


class JsonSplitter:
    """Feed bytes in, get complete top-level JSON texts (bytes) or :data:`TOO_LONG` out."""

    def __init__(self, limit: int = MAX_MESSAGE):
        self.limit = limit
        self._buf = bytearray()
        self._kind: str | None = None
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._size = 0
        self._skipping = False

    @property
    def in_message(self) -> bool:
        """True while a message has begun and not ended (including one being skipped)."""
        return self._kind is not None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (0 between messages or while skipping)."""
        return len(self._buf)

    def _reset(self) -> None:
        self._buf.clear()
        self._kind = None
        self._depth = 0
        self._in_string = self._escape = self._skipping = False
        self._size = 0

    def feed(self, data: bytes) -> list[bytes | TooLong]:
        out: list[bytes | TooLong] = []
        i, n = 0, len(data)
        while i < n:
            if self._kind is None:
                i = _BETWEEN.match(data, i).end()  # type: ignore[union-attr]  # a '*' pattern always matches
                if i == n:
                    break
                first = data[i]
                if first in b"{[":
                    self._kind = _NEST
                elif first == ord('"'):
                    self._kind = _STRING  # the scan below enters the string at this quote
                else:
                    self._kind = _TOKEN
            seg = i
            i, done, abandoned = self._scan(data, i)
            if abandoned:
                self._reset()
                continue
            self._size += i - seg
            if not self._skipping:
                if self._size > self.limit:
                    self._skipping = True
                    self._buf.clear()
                    out.append(TOO_LONG)
                else:
                    self._buf += data[seg:i]
            if done:
                if not self._skipping:
                    message = bytes(self._buf)
                    out.append(message.rstrip() if self._kind == _TOKEN else message)
                self._reset()
        return out

    def _scan(self, data: bytes, i: int) -> tuple[int, bool, bool]:
        """Advance through the current message; return (position, message ended, abandoned)."""
        n = len(data)
        while i < n:
            if self._kind == _TOKEN:
                m = _TOKEN_END.search(data, i)
                if m is None:
                    return n, False, False
                return m.start(), True, False  # the delimiter belongs to what follows
            if self._in_string:
                if self._escape:
                    if data[i] == _RESET:
                        return i + 1, False, True
                    self._escape = False
                    i += 1
                    continue
                m = _IN_STRING.search(data, i)
                if m is None:
                    return n, False, False
                c, i = data[m.start()], m.end()
                if c == _RESET:
                    return i, False, True
                if c == ord("\\"):
                    self._escape = True
                else:
                    self._in_string = False
                    if self._kind == _STRING:
                        return i, True, False
            else:
                m = _IN_NEST.search(data, i)
                if m is None:
                    return n, False, False
                c, i = data[m.start()], m.end()
                if c == _RESET:
                    return i, False, True
                if c in b"{[":
                    self._depth += i - m.start()
                elif c in b"}]":
                    if i - m.start() >= self._depth:  # the message ends inside this run
                        return m.start() + self._depth, True, False
                    self._depth -= i - m.start()
                else:
                    self._in_string = True
        return i, False, False
