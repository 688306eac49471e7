"""Host character devices (``-chardev``): the host end of a guest's console.

Owns: the backend spec (:class:`ChardevConfig`), the four backends -- ``socket`` (a UNIX socket
the VMM creates and listens on), ``pty`` (a new pseudo-terminal), ``stdio`` (the VMM's own
stdin/stdout) and ``file`` (output appended to a file) -- behind one interface a device drives
from its I/O thread, the bounded output buffer, and the input back-pressure switch. Used by
virtio-console; the UART could use it too.

The interface (:class:`Chardev`). :func:`open_chardev` creates the host object (binds the socket,
opens the pty or the file) and raises :class:`ChardevError` with one sentence when it cannot.
The owner then calls :meth:`Chardev.attach` with its I/O thread's loop and an ``on_input``
callback; from then on every method runs on that thread (``close`` after it has stopped):

* :meth:`Chardev.write` never blocks and never fails. Bytes the host cannot take right now are
  buffered, up to :data:`MAX_BUFFERED` bytes, and written when the descriptor becomes writable;
  beyond that they are dropped and counted (``stats.dropped``). So a client that stops reading
  costs the guest its console output, never its progress, and costs the VMM a bounded amount of
  memory. Output while nobody can receive it (a socket with no client, a closed stdout) is
  dropped and counted as well.
* Input is polled only while the owner wants it (:meth:`Chardev.want_input`): a device that has
  no guest buffers to put input in turns it off, and the bytes wait in the host's own buffers
  (the socket's, the pty's, the pipe's) instead of being read and dropped. ``on_input()`` is
  called when input may be read; :meth:`Chardev.read` returns what is there (``b""`` if nothing).

Backend rules:

* socket: the file is created with mode 0600 (set on the socket before ``bind``, so it never
  exists with wider permissions), refused if the path exists (never unlinked), and removed at
  :meth:`~Chardev.close` if it is still ours. One client at a time: while one is connected the
  listening socket is not polled and a second client waits in the backlog, as with QMP. When a
  client hangs up, what it sent that the guest has not taken yet is kept (up to
  :data:`MAX_BACKLOG` bytes) and delivered later, so ``echo cmd | nc -U sock`` reaches the guest.
* pty: the VMM keeps the slave end open too (in raw mode, so the line discipline neither echoes
  the guest's output back as input nor rewrites it), so the pty stays usable while no terminal
  program is attached; its path is logged and printed on stderr the way QEMU does
  (``char device redirected to /dev/pts/N (label ID)``).
* stdio: a terminal on stdin is put in raw mode (except ISIG, so Ctrl-C still ends the VMM, as
  QEMU's ``signal=on`` default does) and restored at close and at exit. End of input ends input.
* file: opened for appending (created with mode 0600 if missing); there is no input.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import PyStratoVirtError
from ..util.eventloop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EventLoop
from ..util.terminal import RawTerminal
from ..util.unixsock import ListenError, ListenFailure, UnixListener

log = logging.getLogger(__name__)

BACKENDS = ("socket", "pty", "stdio", "file")
#: Output the host could not take yet, kept per chardev; beyond this it is dropped.
MAX_BUFFERED = 64 * 1024
#: Input a departed socket client sent that the guest has not taken yet.
MAX_BACKLOG = 64 * 1024
FILE_MODE = 0o600
BACKLOG = 4


class ChardevError(PyStratoVirtError):
    """A chardev cannot be created (its socket path exists, its file cannot be opened, ...)."""


@dataclass(frozen=True)
class ChardevConfig:
    """A host character device (``-chardev``): where a virtio console's bytes go. ``backend``:
    "socket" (a UNIX socket at ``path`` the VMM listens on), "pty" (a new pseudo-terminal),
    "stdio" (the VMM's own stdin/stdout) or "file" (output appended to ``path``)."""

    id: str
    backend: str = "socket"
    path: str | None = None


@dataclass
class ChardevStats:
    """What went through a chardev: bytes read from the host, bytes the host took, bytes
    dropped because nobody could take them (no client, a full buffer, a closed stdout)."""

    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0
    connections: int = 0   # socket clients accepted


def open_chardev(config: ChardevConfig) -> Chardev:
    """Create the host side of ``config``; raises ChardevError with one sentence."""
    if config.backend == "socket":
        return SocketChardev(config.id, _need_path(config))
    if config.backend == "pty":
        return PtyChardev(config.id)
    if config.backend == "stdio":
        return StdioChardev(config.id)
    if config.backend == "file":
        return FileChardev(config.id, _need_path(config))
    raise ChardevError(f"Chardev '{config.id}' has backend '{config.backend}'; the backends are "
                       f"{', '.join(BACKENDS)}.")


def _need_path(config: ChardevConfig) -> str:
    if not config.path:
        raise ChardevError(f"Chardev '{config.id}' ({config.backend}) needs a path.")
    return config.path


class Chardev:
    """The common part: the output buffer, the input switch, the descriptors watched on the
    owner's loop. A backend says which descriptor input comes from and output goes to (-1:
    none right now) and handles its own events (a socket's accept and hang-up)."""

    kind = ""

    def __init__(self, id: str):
        self.id = id
        self.stats = ChardevStats()
        self._loop: EventLoop | None = None
        self._on_input: Callable[[], None] | None = None
        self._want = False
        self._reading = True          # false once input has ended
        self._out = bytearray()       # output the host has not taken yet
        self._backlog = bytearray()   # input read ahead of the guest (a departed client's)
        self._watched: dict[int, int] = {}
        self._closed = False
        self._warned: set[str] = set()

    # -- what a backend provides -----------------------------------------------------------------
    def _in_fd(self) -> int:
        return -1

    def _out_fd(self) -> int:
        return -1

    def _extra_watches(self) -> dict[int, int]:
        """Descriptors watched whatever the owner wants (a listener, a connected client)."""
        return {}

    def _event(self, fd: int, mask: int) -> bool:
        """A backend's own handling of an event on ``fd``; True if it dealt with it."""
        return False

    def _write_fd(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def _output_failed(self, exc: OSError) -> None:
        """The output descriptor refused a write (EPIPE, ENOSPC, ...); the backend decides
        whether output goes on (:meth:`_out_fd` stays valid) or ends."""

    def _input_ended(self) -> None:
        self._reading = False

    # -- the owner's interface (I/O thread) ------------------------------------------------------
    def attach(self, loop: EventLoop, on_input: Callable[[], None]) -> None:
        """Start watching this chardev's descriptors on ``loop``; ``on_input()`` runs there when
        input may be read (only while :meth:`want_input` is on)."""
        self._loop = loop
        self._on_input = on_input
        self._sync()

    def want_input(self, wanted: bool) -> None:
        """Poll for input (True) or leave it in the host's buffers (False)."""
        if wanted == self._want:
            return
        self._want = wanted
        self._sync()
        if wanted and self._backlog and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver)

    @property
    def input_wanted(self) -> bool:
        return self._want

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of input that are there now (``b""`` if none; never blocks)."""
        if n <= 0 or self._closed:
            return b""
        if self._backlog:
            data = bytes(self._backlog[:n])
            del self._backlog[:n]
            if self._backlog:
                # No descriptor will signal the rest: offer it again once this call is done.
                assert self._loop is not None  # a backlog is kept only by an attached chardev
                self._loop.call_soon_threadsafe(self._deliver)
            else:
                self._sync()   # back to polling the descriptor (a new client's)
            return data
        fd = self._in_fd()
        if fd < 0 or not self._reading:
            return b""
        try:
            data = os.read(fd, n)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            self._read_failed(exc)
            return b""
        if not data:
            self._input_ended()
            self._sync()
            return b""
        self.stats.bytes_in += len(data)
        return data

    def _read_failed(self, exc: OSError) -> None:
        self._warn("read", "chardev %s: reading input failed (%s); input ends", self.id, exc.strerror or exc)
        self._input_ended()
        self._sync()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the host: now, later (buffered), or dropped and counted; never blocks."""
        view = memoryview(data).cast("B")
        if not len(view) or self._closed:
            return
        if not self._out:
            view = view[self._try_write(view):]
        if not view:
            return
        if self._out_fd() < 0:   # nobody to take it (no client, stdout gone)
            self.stats.dropped += len(view)
            return
        take = min(MAX_BUFFERED - len(self._out), len(view))
        self._out += view[:take]
        if take < len(view):
            self.stats.dropped += len(view) - take
            self._warn("full", "chardev %s: the host is not reading its output; output beyond "
                       "%d buffered bytes is dropped", self.id, MAX_BUFFERED)
        self._sync()

    def _try_write(self, view: memoryview) -> int:
        """Write as much of ``view`` as the host takes now; returns how much it took. A
        descriptor that refuses output for good is the backend's to handle (``_output_failed``)."""
        done = 0
        while done < len(view):
            fd = self._out_fd()
            if fd < 0:
                break
            try:
                n = self._write_fd(fd, view[done:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._output_failed(exc)
                self._sync()
                break
            if n <= 0:
                break
            done += n
            self.stats.bytes_out += n
        return done

    def _flush(self) -> None:
        if not self._out:
            return
        # A copy: a backend that gives up on its descriptor clears the buffer meanwhile.
        done = self._try_write(memoryview(bytes(self._out)))
        del self._out[:done]
        if self._out and self._out_fd() < 0:
            self.stats.dropped += len(self._out)
            self._out.clear()

    @property
    def buffered(self) -> int:
        """Output bytes waiting for the host to take them."""
        return len(self._out)

    def close(self) -> None:
        """Stop watching and release the host side (after the owner's I/O thread stopped)."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        for fd in list(self._watched):
            self._unwatch(fd)
        self._release()

    def _release(self) -> None:
        """Close the backend's own descriptors (and anything else it holds)."""

    # -- watching ------------------------------------------------------------------------------
    def _sync(self) -> None:
        """Watch exactly what is needed now: input while wanted, output while buffered, and
        the backend's own descriptors."""
        loop = self._loop
        if loop is None or self._closed:
            return
        wanted = dict(self._extra_watches())
        fd_in = self._in_fd()
        if fd_in >= 0 and self._want and self._reading and not self._backlog:
            wanted[fd_in] = wanted.get(fd_in, 0) | EPOLLIN
        fd_out = self._out_fd()
        if fd_out >= 0 and self._out:
            wanted[fd_out] = wanted.get(fd_out, 0) | EPOLLOUT
        for fd in list(self._watched):
            if fd not in wanted:
                self._unwatch(fd)
        for fd, mask in wanted.items():
            old = self._watched.get(fd)
            if old is None:
                def on_event(events: int, fd: int = fd) -> None:
                    self._on_event(fd, events)
                try:
                    loop.register(fd, mask, on_event)
                except PermissionError:
                    # A regular file (or /dev/null) cannot be polled: it is always ready.
                    self._always_ready(fd, mask)
                    continue
                self._watched[fd] = mask
            elif old != mask:
                loop.modify(fd, mask)
                self._watched[fd] = mask

    def _unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None and self._loop is not None:
            self._loop.unregister(fd)

    def _always_ready(self, fd: int, mask: int) -> None:
        assert self._loop is not None  # called while watching
        if mask & EPOLLOUT:
            self._loop.call_soon_threadsafe(self._flush)
        if mask & EPOLLIN:
            self._loop.call_soon_threadsafe(self._deliver)

    def _on_event(self, fd: int, mask: int) -> None:
        if self._closed:
            return
        if not self._event(fd, mask):
            if fd == self._out_fd() and self._out and mask & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                self._flush()
            if fd == self._in_fd() and mask & (EPOLLIN | EPOLLHUP | EPOLLERR):
                self._deliver()
        self._sync()

    def _deliver(self) -> None:
        if self._want and not self._closed and self._on_input is not None:
            self._on_input()

    def _warn(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg + " (logged once)", *args)


class SocketChardev(Chardev):
    """A UNIX stream socket at ``path`` that the VMM listens on; one client at a time."""

    kind = "socket"

    def __init__(self, id: str, path: str):
        super().__init__(id)
        self._client: socket.socket | None = None
        try:
            self._listener: UnixListener | None = UnixListener(path, BACKLOG)
        except ListenError as err:
            if err.failure is ListenFailure.EXISTS:
                raise ChardevError(f"The socket path '{path}' of chardev '{id}' already exists; "
                                   "remove it or choose another path.") from None
            if err.failure is ListenFailure.LISTEN:
                raise ChardevError(f"Cannot listen on the socket '{path}' of chardev '{id}': "
                                   f"{err.detail}.") from None
            raise ChardevError(f"Cannot create the socket '{path}' of chardev '{id}': {err.detail}.") from None
        self.path = self._listener.path

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _in_fd(self) -> int:
        return self._client.fileno() if self._client is not None else -1

    _out_fd = _in_fd

    def _extra_watches(self) -> dict[int, int]:
        if self._client is not None:
            return {self._client.fileno(): 0}   # EPOLLHUP/EPOLLERR are always reported
        if self._listener is not None:
            return {self._listener.fileno(): EPOLLIN}
        return {}

    def _write_fd(self, fd: int, data: memoryview) -> int:
        assert self._client is not None  # the output descriptor is the client's
        return self._client.send(data, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)

    def _event(self, fd: int, mask: int) -> bool:
        if self._listener is not None and fd == self._listener.fileno():
            self._accept()
            return True
        if self._client is not None and fd == self._client.fileno() and mask & (EPOLLHUP | EPOLLERR):
            self._hang_up()
            return True
        return False

    def _accept(self) -> None:
        assert self._listener is not None  # its event brought us here
        try:
            client = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._warn("accept", "chardev %s: accept failed: %s", self.id, err.strerror or err)
            return
        self._client = client
        self._reading = True
        self.stats.connections += 1
        # Debug, not info: a routine event after start-up must not move hydropper's quickstart
        # figure, which takes the time of the last log line after the vCPUs started.
        log.debug("chardev %s: client connected on %s", self.id, self.path)

    def _hang_up(self) -> None:
        """The client is gone: keep what it sent that the guest has not taken (bounded)."""
        client = self._client
        assert client is not None  # its hang-up brought us here
        if self._reading:
            while len(self._backlog) < MAX_BACKLOG:
                try:
                    data = client.recv(MAX_BACKLOG - len(self._backlog))
                except OSError:
                    break
                if not data:
                    break
                self.stats.bytes_in += len(data)
                self._backlog += data
        self._drop_client()
        if self._backlog and self._want:
            assert self._loop is not None  # its event brought us here
            self._loop.call_soon_threadsafe(self._deliver)

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._unwatch(client.fileno())
        client.close()
        if self._out:
            self.stats.dropped += len(self._out)
            self._out.clear()
        self._reading = True
        log.debug("chardev %s: client disconnected", self.id)

    def _input_ended(self) -> None:
        # The client shut down its sending side; it may still read the guest's output.
        self._reading = False

    def _read_failed(self, exc: OSError) -> None:
        self._drop_client()
        self._sync()

    def _output_failed(self, exc: OSError) -> None:
        self._drop_client()

    def _release(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._listener is not None:
            self._listener.close()  # removes the socket file if it is still ours
            self._listener = None


class PtyChardev(Chardev):
    """A new pseudo-terminal; the guest's bytes go to its master side."""

    kind = "pty"

    def __init__(self, id: str):
        super().__init__(id)
        try:
            master, slave = os.openpty()
        except OSError as err:
            raise ChardevError(f"Cannot create a pty for chardev '{id}': {err.strerror or err}.") from None
        try:
            tty.setraw(slave)
            os.set_blocking(master, False)
            os.set_inheritable(master, False)
            os.set_inheritable(slave, False)
            self.path = os.ttyname(slave)
        except (OSError, termios.error) as err:
            os.close(master)
            os.close(slave)
            raise ChardevError(f"Cannot set up the pty of chardev '{id}': {err}.") from None
        self._master, self._slave = master, slave
        log.info("char device redirected to %s (label %s)", self.path, id)
        print(f"char device redirected to {self.path} (label {id})", file=sys.stderr, flush=True)

    def _in_fd(self) -> int:
        return self._master

    _out_fd = _in_fd

    def _release(self) -> None:
        os.close(self._master)
        os.close(self._slave)


class StdioChardev(Chardev):
    """The VMM's own stdin (input) and stdout (output)."""

    kind = "stdio"

    def __init__(self, id: str, in_fd: int = 0, out_fd: int = 1):
        super().__init__(id)
        self._in, self._outfd = in_fd, out_fd
        self._terminal = RawTerminal(in_fd)
        self._out_gone = False
        try:
            self._terminal.enter(keep_signals=True)  # Ctrl-C still ends the VMM
            os.set_blocking(in_fd, False)
        except (OSError, termios.error) as err:
            self.restore_terminal()
            raise ChardevError(f"Cannot use stdin for chardev '{id}': {err}.") from None

    def _in_fd(self) -> int:
        return self._in

    def _out_fd(self) -> int:
        return -1 if self._out_gone else self._outfd

    def _output_failed(self, exc: OSError) -> None:
        self._out_gone = True
        log.info("chardev %s: stdout refused output (%s); further output is dropped", self.id,
                 exc.strerror or exc)

    def restore_terminal(self) -> None:
        self._terminal.restore()

    def _release(self) -> None:
        try:
            os.set_blocking(self._in, True)
        except OSError:
            pass
        self.restore_terminal()


class FileChardev(Chardev):
    """Output appended to a file; no input."""

    kind = "file"

    def __init__(self, id: str, path: str):
        super().__init__(id)
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as err:
            raise ChardevError(f"Cannot open the file '{path}' of chardev '{id}': "
                               f"{err.strerror or err}.") from None
        except (ValueError, UnicodeError) as err:
            raise ChardevError(f"Cannot open the file '{path}' of chardev '{id}': {err}.") from None

    def _out_fd(self) -> int:
        return self._fd

    def _output_failed(self, exc: OSError) -> None:
        # A full disk is not the guest's problem: this output is lost, the next write tries again.
        self.stats.dropped += len(self._out)
        self._out.clear()
        self._warn("file", "chardev %s: writing %s failed (%s); output is dropped while it fails",
                   self.id, self.path, exc.strerror or exc)

    def _release(self) -> None:
        os.close(self._fd)
