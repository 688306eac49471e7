"""The QMP unix-socket server: one client at a time, on the control plane's event loop.

This module owns the socket (``-api-channel unix:PATH`` / ``-qmp unix:PATH,server,nowait``) and
the connection's life: the greeting, reading and splitting the command stream, answering each
command in order, writing events, and flushing on shutdown. It turns bytes into typed requests
with :mod:`.schema` and hands them to the machine's :class:`~pystratovirt.machine.requests.Executor`
on the loop thread; the machine never sees JSON.

Behaviour, after StratoVirt:

* The socket file is created with mode 0600 (set on the socket before ``bind``, so the file never
  exists with wider permissions and the process umask is left alone), refused if PATH already
  exists, and removed by :meth:`QmpServer.close` if it is still ours.
* One client at a time: while a client is connected the listening socket is not polled. A second
  client's ``connect`` succeeds (kernel backlog) and it is greeted when the first one leaves.
* Events emitted while a command executes are written before that command's reply, which is what
  puts STOP/RESUME/DEVICE_DELETED/SHUTDOWN ahead of ``{"return":{}}``. With no client, events are
  dropped.
* A client that stops reading cannot stall the loop: output is buffered up to ``max_output`` bytes
  and the client is dropped beyond that. An over-long message is answered with an error and the
  rest of it skipped (see :mod:`.framing`); the connection stays open.
* No rate limit: StratoVirt's 100 commands/second leak bucket guards a shared process, but every
  command here is cheap and bounded by the read size, and a limit would break scripted clients.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from typing import Callable

from ..errors import PyStratoVirtError
from ..machine.requests import (CommandInfo, ErrorClass, Event, Executor, MachineError,
                                QmpCapabilities, QueryCommands, QueryVersion, Request)
from ..util.eventloop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, EventLoop
from .framing import TOO_LONG, JsonSplitter
from .schema import (GREETING, MAX_MESSAGE, VERSION, QmpError, command_names, decode,
                     encode_error, encode_event, encode_return, parse_command)

log = logging.getLogger(__name__)

#: Output a client may leave unread before it is dropped.
MAX_OUTPUT = 1 << 20
READ_SIZE = 65536
BACKLOG = 8
SOCKET_MODE = 0o600


class QmpSocketError(PyStratoVirtError):
    """The QMP socket could not be created (for example, its path already exists)."""


class _Client:
    """One accepted connection: its socket, input splitter and unsent output."""

    def __init__(self, sock: socket.socket, max_message: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.splitter = JsonSplitter(max_message)
        self.out = bytearray()
        self.reading = True  # false once the client has shut down its side
        self.mask = EPOLLIN | EPOLLRDHUP


class QmpServer:
    """Serve QMP on a unix socket at ``path``, executing requests with ``executor``.

    Wiring: construct it with the loop and the machine (``executor`` is a plain attribute, so it
    may also be set later, before the first command arrives); :meth:`start` creates the socket;
    the machine reports events with :meth:`emit` on the loop thread or :meth:`emit_threadsafe`
    from any other thread; after the loop has stopped, :meth:`close` flushes the last reply and
    removes the socket. All other methods run on the loop thread.
    """

    def __init__(self, loop: EventLoop, path: str | os.PathLike[str], executor: Executor | None,
                 *, max_message: int = MAX_MESSAGE, max_output: int = MAX_OUTPUT,
                 clock_ns: Callable[[], int] = time.time_ns):
        self.executor = executor
        self.path = os.path.abspath(os.fspath(path))  # daemonizing may chdir("/") later
        self._loop = loop
        self._max_message = max_message
        self._max_output = max_output
        self._clock_ns = clock_ns
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        self._listening = False
        self._client: _Client | None = None

    # -- the listening socket -------------------------------------------------------------------
    def start(self) -> None:
        """Create the socket file and start accepting; raise QmpSocketError if that fails."""
        if self._listener is not None:
            raise QmpSocketError("The QMP server is already started.")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux gives the bound file the socket inode's mode (minus umask), so this makes
            # the file 0600 from the moment it exists without touching the process-wide umask.
            os.fchmod(sock.fileno(), SOCKET_MODE)
            sock.bind(self.path)
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:  # the path exists, as a socket or any other file
                raise QmpSocketError(f"QMP socket path {self.path} already exists; remove it "
                                     "or choose another path.") from None
            raise QmpSocketError(f"Cannot create QMP socket {self.path}: "
                                 f"{err.strerror or err}.") from None
        try:
            sock.listen(BACKLOG)  # first: a client that sees the file can connect at once
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            self._unlink()
            raise QmpSocketError(f"Cannot listen on QMP socket {self.path}: {err}.") from None
        self._listener = sock
        self._listen()
        log.debug("QMP listening on %s", self.path)

    def _listen(self) -> None:
        if self._listener is not None and not self._listening:
            self._loop.register(self._listener.fileno(), EPOLLIN, self._on_accept)
            self._listening = True

    def _park(self) -> None:
        if self._listening:
            self._loop.unregister(self._listener.fileno())
            self._listening = False

    def _on_accept(self, _mask: int) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            # Out of descriptors or similar: stop polling for a moment instead of spinning.
            log.warning("QMP accept failed: %s", err)
            self._park()
            self._loop.call_later(0.1, self._listen)
            return
        sock.setblocking(False)
        self._park()  # one client at a time; the next waits in the backlog
        client = _Client(sock, self._max_message)
        self._client = client
        self._loop.register(client.fd, client.mask, self._on_client)
        log.debug("QMP client connected")
        self._send(GREETING)

    # -- the connection -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._client is not None

    def _on_client(self, mask: int) -> None:
        client = self._client
        if client is None:
            return
        if mask & EPOLLOUT:
            self._write(client)
        if self._client is not client:
            return
        if client.reading and mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            self._read(client)
        elif mask & (EPOLLHUP | EPOLLERR):
            self._write(client)  # the peer is gone: this fails and drops it

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            # The client shut down its side: it has sent all it will, but may still read the
            # replies to what it sent, so flush them before hanging up.
            client.reading = False
            self._update(client)
            return
        for frame in client.splitter.feed(data):
            if frame is TOO_LONG:
                self._send(encode_error(ErrorClass.GENERIC_ERROR,
                                        f"Message is too long (limit {self._max_message} bytes)"))
            else:
                self._send(self._answer(frame))
            if self._client is not client:
                return  # dropped (or the server closed) while answering

    def _answer(self, frame: bytes) -> bytes:
        try:
            command = parse_command(decode(frame))
        except QmpError as err:
            return encode_error(err.error_class, err.desc, err.id)
        try:
            return encode_return(self._execute(command.request), command.id)
        except PyStratoVirtError as err:
            return encode_error(err.error_class, err.desc, command.id)
        except Exception:  # a machine bug must cost one reply, not the VMM
            log.exception("QMP command %r failed", command.request)
            return encode_error(ErrorClass.GENERIC_ERROR,
                                f"Internal error while executing {command.execute}", command.id)

    def _execute(self, request: Request) -> object:
        # Protocol-level commands are the server's own; the machine never sees them.
        match request:
            case QmpCapabilities():
                return None  # stateless, as in StratoVirt: other commands work without it
            case QueryVersion():
                return VERSION
            case QueryCommands():
                return [CommandInfo(name) for name in command_names()]
        if self.executor is None:
            raise MachineError("The virtual machine is not ready")
        return self.executor.execute(request)

    def _send(self, data: bytes) -> None:
        client = self._client
        if client is None:
            return
        client.out += data
        if not client.mask & EPOLLOUT:  # otherwise the socket is full; wait for EPOLLOUT
            self._write(client)
        if self._client is client and len(client.out) > self._max_output:
            log.warning("QMP client is not reading its replies (%d bytes unsent); dropping it",
                        len(client.out))
            self._drop(client)

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
        self._update(client)

    def _update(self, client: _Client) -> None:
        """Poll for what the client still needs; hang up once it is done both ways."""
        if not client.reading and not client.out:
            self._drop(client)
            return
        mask = (EPOLLIN | EPOLLRDHUP if client.reading else 0) | (EPOLLOUT if client.out else 0)
        if mask != client.mask:
            self._loop.modify(client.fd, mask)
            client.mask = mask

    def _drop(self, client: _Client) -> None:
        if self._client is not client:
            return
        self._client = None
        self._loop.unregister(client.fd)
        client.sock.close()
        log.debug("QMP client disconnected")
        self._listen()  # greet the next client, if one is waiting

    # -- events ---------------------------------------------------------------------------------
    def emit(self, event: Event, timestamp_ns: int | None = None) -> None:
        """Send ``event`` to the client (on the loop thread); dropped when nobody is connected."""
        data = encode_event(event, self._clock_ns() if timestamp_ns is None else timestamp_ns)
        self._send(data)

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
            self._listener.close()
            self._listener = None
            self._unlink()
        client = self._client
        if client is not None:
            self.flush(timeout)
            self._drop(client)

    def _unlink(self) -> None:
        # Only remove the file we created: someone may have replaced it since.
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass
        self._identity = None
