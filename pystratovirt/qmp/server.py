"""The QMP unix-socket server: one client at a time, on the control plane's event loop.

This module owns the socket (``-api-channel unix:PATH`` / ``-qmp unix:PATH,server,nowait``) and
the connection's life: the greeting, reading and splitting the command stream, answering each
command in order, writing events, receiving descriptors, and flushing on shutdown. It turns bytes
into typed requests with :mod:`.schema` and hands them to the machine's
:class:`~pystratovirt.machine.requests.Executor` on the loop thread; the machine never sees JSON.

Behaviour, after StratoVirt:

* The socket file is created with mode 0600 (set on the socket before ``bind``, so the file never
  exists with wider permissions and the process umask is left alone), refused if PATH already
  exists, and removed by :meth:`QmpServer.close` if it is still ours.
* One client at a time: while a client is connected the listening socket is not polled. A second
  client's ``connect`` succeeds (kernel backlog) and it is greeted when the first one leaves.
* The :class:`~.wire.Wire` given at construction picks the greeting's version and the line
  end (0.x: the seed's bytes and ``\n``; 2.x: major 5 and ``\r\n``).
* Events emitted while a command executes are written before that command's reply, which is what
  puts STOP/RESUME/DEVICE_DELETED/SHUTDOWN ahead of ``{"return":{}}``, and in the same write: a
  client that reads one chunk per command (hydropper's single ``recv(1024)``, which returns the
  first non-event line and drops the rest) finds both in it. With no client, events are dropped.
* An over-long message is answered with an error and the rest of it skipped (see
  :mod:`.framing`); the connection stays open.
* No rate limit: StratoVirt's 100 commands/second leak bucket guards a shared process, but every
  command here is cheap and back-pressure (below) bounds what a client can make us hold.

Back-pressure. Every command is answered, in order, however fast a client sends and however
slowly it reads. While a client's unsent output is above ``max_output`` the server answers none
of its queued commands and stops reading its socket, so the client's own writes block in the
kernel; when the output drains below the bound it goes on where it stopped. Memory per client is
therefore bounded: one read (``READ_SIZE``) of queued commands, ``max_output`` plus one reply,
and events. Events cannot wait (the machine does not stop for a slow client), so they are
queued on top of the bound up to ``max_events`` more bytes; beyond that, events for a client that
is not reading are discarded and counted, with one warning in the log per episode (the machine's
events come one per command or are rate-limited, so only a client that has stopped reading ever
gets there). A client whose socket accepts no byte for ``stall_timeout`` seconds while output is
pending is dropped, with a warning: it has stopped reading for good, and the next client is
greeted.

Replies that come later. A command the machine cannot finish at once (``stop`` waiting for the
vCPUs to park, a hot-plug waiting for the device's I/O thread to switch backends) is answered
with a ``concurrent.futures.Future``; the server then answers nothing else of that client until
it completes (so replies stay in order), while the control loop goes on serving the console,
timers and events. Events the machine emits on completion come before the reply, as always.

Descriptors. The socket is read with ``recvmsg``; SCM_RIGHTS descriptors (at most
:data:`MAX_FDS` per message, received close-on-exec; the kernel closes any beyond the buffer)
belong to the command whose bytes they arrived with (govmm sends ``getfd`` and its descriptor in
one ``sendmsg``). ``getfd`` hands the first to the machine (which owns it from then on) and
closes the rest; every other command, and a message that is not a valid command, closes them as
soon as it is answered. Descriptors that arrive with nothing but whitespace (qemu.qmp's
``send_fd_scm`` sends a lone space) wait for the next command; a newer batch replaces an older
one still waiting, as in QEMU. Nothing received is ever leaked: a client
that leaves takes its unclaimed descriptors with it.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import NoReturn

from ..errors import PyStratoVirtError
from ..machine.requests import (
    CommandInfo,
    ErrorClass,
    Event,
    Executor,
    GetFd,
    MachineError,
    QmpCapabilities,
    QueryCommands,
    QueryVersion,
    Request,
)
from ..util.eventloop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, EventLoop, Timer
from ..util.unixsock import ListenError, ListenFailure, UnixListener
from .framing import JsonSplitter, TooLong
from .schema import (
    MAX_MESSAGE,
    Command,
    QmpError,
    command_names,
    decode,
    encode_error,
    encode_event,
    encode_greeting,
    encode_return,
    parse_command,
)
from .wire import WIRE_0X, Wire

log = logging.getLogger(__name__)

#: Unsent output above which a client's commands wait (and its socket is not read).
MAX_OUTPUT = 1 << 20
#: Event bytes that may be queued on top of MAX_OUTPUT before events are discarded.
MAX_EVENTS = 1 << 20
#: Seconds a client may accept no output at all, while some is pending, before it is dropped.
STALL_TIMEOUT = 60.0
#: Descriptors one message may carry (QEMU's socket chardev takes 16 too).
MAX_FDS = 16
READ_SIZE = 65536
BACKLOG = 8
_INT_SIZE = array.array("i").itemsize


class QmpSocketError(PyStratoVirtError):
    """The QMP socket could not be created (for example, its path already exists)."""


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _unconsumed(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that the peer has not read yet (SIOCOUTQ), or -1."""
    try:
        count: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0]
        return count
    except OSError:
        return -1


class _Frame:
    """One message taken off the stream (or TOO_LONG), with the descriptors that came with it."""

    __slots__ = ("message", "fds")

    def __init__(self, message: bytes | TooLong, fds: list[int] | None = None):
        self.message = message
        self.fds = fds if fds is not None else []


class _Later:
    """A command whose reply comes when ``future`` completes."""

    __slots__ = ("command", "future")

    def __init__(self, command: Command, future: Future[object]):
        self.command = command
        self.future = future


def _reraise(exc: BaseException) -> NoReturn:
    raise exc


class _Client:
    """One accepted connection: its socket, input splitter, queued commands and unsent output."""

    def __init__(self, sock: socket.socket, max_message: int, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.splitter = JsonSplitter(max_message)
        self.frames: deque[_Frame] = deque()  # read but not answered yet
        self.waiting_fds: list[int] = []  # arrived with whitespace only: for the next command
        self.out = bytearray()
        self.reading = True  # false once the client has shut down its side
        self.mask = EPOLLIN | EPOLLRDHUP
        self.progress = now  # when its socket last accepted output (or output became pending)
        self.in_flight = -1  # bytes it has not consumed from its socket, at the last stall check
        self.stall_timer: Timer | None = None
        self.events_dropped = 0
        self.answering = False  # a command is executing: its reply is still to come
        self.later: Future[object] | None = None  # a command whose reply comes when this completes
        self.warned_ctrunc = False

    def release_fds(self) -> None:
        _close_all(self.waiting_fds)
        for frame in self.frames:
            _close_all(frame.fds)


class QmpServer:
    """Serve QMP on a unix socket at ``path``, executing requests with ``executor``.

    Wiring: construct it with the loop and the machine (``executor`` is a plain attribute, so it
    may also be set later, before the first command arrives); :meth:`start` creates the socket;
    the machine reports events with :meth:`emit` on the loop thread or :meth:`emit_threadsafe`
    from any other thread; after the loop has stopped, :meth:`close` flushes the last reply and
    removes the socket. All other methods run on the loop thread.
    """

    def __init__(self, loop: EventLoop, path: str | os.PathLike[str], executor: Executor | None,
                 *, wire: Wire = WIRE_0X, max_message: int = MAX_MESSAGE,
                 max_output: int = MAX_OUTPUT, max_events: int = MAX_EVENTS,
                 stall_timeout: float = STALL_TIMEOUT,
                 clock_ns: Callable[[], int] = time.time_ns):
        self.executor = executor
        self.path = os.path.abspath(os.fspath(path))  # daemonizing may chdir("/") later
        self.wire = wire
        self._loop = loop
        self._greeting = encode_greeting(wire.version, wire.line_end)
        self._max_message = max_message
        self._max_output = max_output
        self._max_events = max_events
        self._stall_timeout = stall_timeout
        self._clock_ns = clock_ns
        self._listener: UnixListener | None = None
        self._listening = False
        self._client: _Client | None = None

    # -- the listening socket -------------------------------------------------------------------
    def start(self) -> None:
        """Create the socket file and start accepting; raise QmpSocketError if that fails."""
        if self._listener is not None:
            raise QmpSocketError("The QMP server is already started.")
        try:
            listener = UnixListener(self.path, BACKLOG)
        except ListenError as err:
            if err.failure is ListenFailure.EXISTS:
                raise QmpSocketError(f"QMP socket path {self.path} already exists; remove it "
                                     "or choose another path.") from None
            if err.failure is ListenFailure.LISTEN:
                raise QmpSocketError(f"Cannot listen on QMP socket {self.path}: {err.detail}.") from None
            raise QmpSocketError(f"Cannot create QMP socket {self.path}: {err.detail}.") from None
        self._listener = listener
        self._listen()
        log.debug("QMP listening on %s", self.path)

    def moved(self, path: str) -> None:
        """The process chrooted: its socket file is now reached as ``path`` (so it can still be
        removed at exit)."""
        self.path = path
        if self._listener is not None:
            self._listener.path = path

    def _listen(self) -> None:
        if self._listener is not None and not self._listening:
            self._loop.register(self._listener.fileno(), EPOLLIN, self._on_accept)
            self._listening = True

    def _park(self) -> None:
        if self._listening:
            assert self._listener is not None  # listening means there is a listener
            self._loop.unregister(self._listener.fileno())
            self._listening = False

    def _on_accept(self, _mask: int) -> None:
        assert self._listener is not None  # registered only while listening
        try:
            sock = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            # Out of descriptors or similar: stop polling for a moment instead of spinning.
            log.warning("QMP accept failed: %s", err)
            self._park()
            self._loop.call_later(0.1, self._listen)
            return
        self._park()  # one client at a time; the next waits in the backlog
        client = _Client(sock, self._max_message, time.monotonic())
        self._client = client
        self._loop.register(client.fd, client.mask, self._on_client)
        log.debug("QMP client connected")
        self._send(self._greeting)

    # -- the connection -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def unsent(self) -> int:
        """Bytes of output the current client has not accepted yet (0 without a client)."""
        return len(self._client.out) if self._client is not None else 0

    def _on_client(self, mask: int) -> None:
        client = self._client
        if client is None:
            return
        if mask & EPOLLOUT:
            self._write(client)
        if self._client is not client:
            return
        if client.mask & EPOLLIN and mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            self._read(client)
        elif mask & (EPOLLHUP | EPOLLERR):
            # The peer is gone both ways (a half-closed peer gets EOF, not HUP): nobody can read
            # what is still to come, and a level-triggered HUP must not spin the loop meanwhile.
            self._drop(client)
            return
        if self._client is client:
            self._pump(client)

    def _read(self, client: _Client) -> None:
        try:
            data, ancdata, flags, _ = client.sock.recvmsg(
                READ_SIZE, socket.CMSG_SPACE(MAX_FDS * _INT_SIZE), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        fds = self._received_fds(client, ancdata, flags)
        if not data:
            # The client shut down its side: it has sent all it will, but may still read the
            # replies to what it sent, so answer and flush them before hanging up.
            _close_all(fds)
            client.reading = False
            return
        frames = [_Frame(m) for m in client.splitter.feed(data)]
        if client.waiting_fds and frames:
            frames[0].fds, client.waiting_fds = client.waiting_fds, []
        if fds:
            # The kernel ends a read with the bytes of the sendmsg that carried descriptors (it
            # may glue earlier writes in front). So they came with the message still open at the
            # end of this data; else with the last one completed in it, if at most a line end
            # follows that message (govmm sends "{...}\n"); else alone (qemu.qmp sends " "), and
            # they wait for the next command.
            if client.splitter.in_message:
                owner = None
            elif frames and data[len(data.rstrip(b" \t\r\n")):] in (b"", b"\n", b"\r\n"):
                owner = frames[-1]
            else:
                owner = None
            if owner is None:
                _close_all(client.waiting_fds)
                client.waiting_fds = fds
            else:
                _close_all(owner.fds)
                owner.fds = fds
        client.frames.extend(frames)

    @staticmethod
    def _received_fds(client: _Client, ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _INT_SIZE
                fds.extend(array.array("i", payload[:usable]))
        if flags & socket.MSG_CTRUNC and not client.warned_ctrunc:
            client.warned_ctrunc = True  # once per client: a client must not fill the log
            log.warning("QMP client sent more than %d file descriptors in one message; the "
                        "kernel closed the rest", MAX_FDS)
        return fds

    def _pump(self, client: _Client) -> None:
        """Answer queued commands while the output is below the bound and no reply is still to
        come, then poll accordingly."""
        while client.frames and client.later is None and len(client.out) <= self._max_output:
            frame = client.frames.popleft()
            client.answering = True
            try:
                reply = self._answer(frame)
            finally:
                client.answering = False
            if isinstance(reply, _Later):
                self._wait_for(client, reply)
                break
            self._send(reply)
            if self._client is not client:
                return  # dropped (or the server closed) while answering
        self._update(client)

    def _wait_for(self, client: _Client, later: _Later) -> None:
        client.later = later.future

        def completed(_future: Future[object]) -> None:  # on whatever thread completed it
            self._loop.call_soon_threadsafe(lambda: self._finish(client, later))
        later.future.add_done_callback(completed)

    def _finish(self, client: _Client, later: _Later) -> None:
        if self._client is not client:
            return  # the client left while the command ran: nobody to tell
        client.later = None
        future = later.future
        exc = future.exception()
        if exc is None:
            reply = self._encode_result(later.command, lambda: future.result())
        else:
            reply = self._encode_result(later.command, lambda: _reraise(exc))
        self._send(reply)
        if self._client is client:
            self._pump(client)

    def _encode_result(self, command: Command, produce: Callable[[], object]) -> bytes:
        """The reply for ``command``: ``produce()``'s result, or the error it raises."""
        line_end = self.wire.line_end
        try:
            return encode_return(produce(), command.id, line_end)
        except PyStratoVirtError as err:
            return encode_error(err.error_class, err.desc, command.id, line_end)
        except Exception:  # a machine bug must cost one reply, not the VMM
            log.exception("QMP command %r failed", command.request)
            return encode_error(ErrorClass.GENERIC_ERROR,
                                f"Internal error while executing {command.execute}", command.id,
                                line_end)

    def _answer(self, frame: _Frame) -> bytes | _Later:
        fds, frame.fds = frame.fds, []
        line_end = self.wire.line_end
        try:
            if isinstance(frame.message, TooLong):  # TOO_LONG, its one instance
                raise QmpError(f"Message is too long (limit {self._max_message} bytes)")
            command = parse_command(decode(frame.message))
            request = command.request
            if isinstance(request, GetFd):
                if not fds:
                    raise QmpError("No file descriptor supplied via SCM_RIGHTS", id=command.id)
                request = replace(request, fd=fds.pop(0))
        except QmpError as err:
            return encode_error(err.error_class, err.desc, err.id, line_end)
        finally:
            _close_all(fds)  # whatever the command did not take
        if request is not command.request:
            command = replace(command, request=request)
        result: object = None

        def execute() -> object:
            nonlocal result
            result = self._execute(request)
            return None if isinstance(result, Future) else result
        reply = self._encode_result(command, execute)
        if isinstance(result, Future):
            return _Later(command, result)
        return reply

    def _execute(self, request: Request) -> object:
        # Protocol-level commands are the server's own; the machine never sees them.
        match request:
            case QmpCapabilities():
                return None  # stateless, as in StratoVirt: other commands work without it
            case QueryVersion():
                return self.wire.version
            case QueryCommands():
                return [CommandInfo(name) for name in command_names()]
        if self.executor is None:
            if isinstance(request, GetFd) and request.fd is not None:
                _close_all([request.fd])  # nobody to own it yet
            raise MachineError("The virtual machine is not ready")
        return self.executor.execute(request)

    def _send(self, data: bytes) -> None:
        client = self._client
        if client is None:
            return
        if not client.out:
            client.progress = time.monotonic()  # the stall clock starts when output is pending
        client.out += data
        if not client.mask & EPOLLOUT:  # otherwise the socket is full; wait for EPOLLOUT
            self._write(client)

    def _write(self, client: _Client) -> None:
        while client.out:
            try:
                n = client.sock.send(client.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client)
                return
            del client.out[:n]
            client.progress = time.monotonic()
        if client.events_dropped and len(client.out) <= self._max_output:
            log.warning("QMP client is reading again; %d event(s) were discarded while it was not",
                        client.events_dropped)
            client.events_dropped = 0
        self._update(client)

    def _update(self, client: _Client) -> None:
        """Poll for what the client still needs; hang up once it is done both ways."""
        if not (client.reading or client.frames or client.out or client.answering or client.later):
            self._drop(client)
            return
        # Input is read only when every command read so far is answered and there is room for
        # more output: that is the back-pressure.
        want_input = client.reading and not client.frames and len(client.out) <= self._max_output
        mask = (EPOLLIN | EPOLLRDHUP if want_input else 0) | (EPOLLOUT if client.out else 0)
        if mask != client.mask:
            self._loop.modify(client.fd, mask)
            client.mask = mask
        if client.out and client.stall_timer is None:
            client.stall_timer = self._loop.call_later(self._stall_timeout,
                                                       lambda: self._check_stall(client))

    def _check_stall(self, client: _Client) -> None:
        client.stall_timer = None
        if self._client is not client or not client.out:
            return
        # A reader that consumes part of what the socket holds frees no room for us until the
        # kernel's writability threshold (a quarter of the send buffer) is reached, which can
        # take longer than a slow reader needs to look stuck; the socket's own count of bytes
        # not yet consumed shows its progress directly.
        in_flight = _unconsumed(client.sock)
        if in_flight != client.in_flight:
            client.in_flight = in_flight
            client.progress = time.monotonic()
        idle = time.monotonic() - client.progress
        if idle >= self._stall_timeout:
            log.warning("QMP client accepted no output for %.0f s with %d bytes pending; "
                        "dropping it", idle, len(client.out))
            self._drop(client)
            return
        client.stall_timer = self._loop.call_later(self._stall_timeout - idle,
                                                   lambda: self._check_stall(client))

    def _drop(self, client: _Client) -> None:
        if self._client is not client:
            return
        self._client = None
        if client.stall_timer is not None:
            client.stall_timer.cancel()
            client.stall_timer = None
        self._loop.unregister(client.fd)
        client.sock.close()
        client.release_fds()
        log.debug("QMP client disconnected")
        self._listen()  # greet the next client, if one is waiting

    # -- events ---------------------------------------------------------------------------------
    def emit(self, event: Event, timestamp_ns: int | None = None) -> None:
        """Send ``event`` to the client (on the loop thread); dropped when nobody is connected,
        and discarded (counted, logged once) while the client's backlog is over the event bound."""
        client = self._client
        if client is None:
            return
        if len(client.out) > self._max_output + self._max_events:
            if not client.events_dropped:
                log.warning("QMP client is not reading (%d bytes unsent); discarding events "
                            "until it does", len(client.out))
            client.events_dropped += 1
            return
        data = encode_event(event, self._clock_ns() if timestamp_ns is None else timestamp_ns,
                            self.wire.line_end)
        if client.answering or client.later is not None:
            # Held for the reply that follows, so the two leave in one write (see above).
            if not client.out:
                client.progress = time.monotonic()
            client.out += data
            return
        self._send(data)
        if self._client is client:
            self._update(client)

    def emit_threadsafe(self, event: Event) -> None:
        """:meth:`emit` from any thread; the timestamp is taken now, not when the loop runs it."""
        timestamp_ns = self._clock_ns()
        self._loop.call_soon_threadsafe(lambda: self.emit(event, timestamp_ns))

    # -- shutdown -------------------------------------------------------------------------------
    def flush(self, timeout: float = 1.0) -> bool:
        """Write out pending output, blocking up to ``timeout`` seconds; True if all went out."""
        client = self._client
        if client is None:
            return True
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(client.fd, select.POLLOUT)
        while True:
            self._write(client)
            if not client.out:
                return True
            if self._client is not client:
                return False  # the peer went away
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)

    def close(self, timeout: float = 1.0) -> None:
        """Flush the client's output (bounded), hang up, and remove the socket file. Idempotent.

        Call it on the loop thread or after the loop has stopped.
        """
        # The listener goes first, so nothing below re-arms it for a next client.
        if self._listener is not None:
            self._park()
            self._listener.close()  # removes the socket file if it is still ours
            self._listener = None
        client = self._client
        if client is not None:
            self.flush(timeout)
            self._drop(client)
