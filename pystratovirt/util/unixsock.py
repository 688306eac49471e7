"""The listening UNIX sockets the VMM offers (the QMP socket, a console's socket chardev).

One rule for each: the file is mode 0600 from the moment it exists (set on the socket before
``bind``: Linux gives the bound file the socket inode's mode, so the process-wide umask is left
alone); a path that already exists is refused, never unlinked (StratoVirt's rule: it may be
another VM's); and :meth:`UnixListener.close` removes the file only if it is still the one we
bound (someone may have replaced it since). Callers word the refusal for their own users.
"""

from __future__ import annotations

import enum
import errno
import os
import socket

SOCKET_MODE = 0o600


class ListenFailure(enum.Enum):
    EXISTS = "exists"   # the path exists (a socket or any other file)
    BIND = "bind"       # bind() failed otherwise (no such directory, too long, permission...)
    LISTEN = "listen"   # the file was made but listen() failed (it is removed again)


class ListenError(Exception):
    """Why a listening socket could not be made; ``failure`` says which step, ``detail`` the
    system's words (strerror)."""

    def __init__(self, failure: ListenFailure, detail: str):
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


class UnixListener:
    """A non-blocking, close-on-exec listening UNIX stream socket at ``path`` (made absolute:
    daemonizing may change directory later)."""

    def __init__(self, path: str | os.PathLike[str], backlog: int):
        self.path = os.path.abspath(os.fspath(path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.fchmod(sock.fileno(), SOCKET_MODE)
            sock.bind(self.path)
        except OSError as err:
            sock.close()
            failure = ListenFailure.EXISTS if err.errno == errno.EADDRINUSE else ListenFailure.BIND
            raise ListenError(failure, err.strerror or str(err)) from None
        except (ValueError, UnicodeError) as err:  # an embedded NUL, an unencodable name
            sock.close()
            raise ListenError(ListenFailure.BIND, str(err)) from None
        try:
            st = os.stat(self.path)
            self._identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
            sock.listen(backlog)  # a client that sees the file can connect at once
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            self._identity = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
            raise ListenError(ListenFailure.LISTEN, err.strerror or str(err)) from None
        self.sock: socket.socket | None = sock

    def fileno(self) -> int:
        assert self.sock is not None, "the listener is closed"
        return self.sock.fileno()

    def accept(self) -> socket.socket:
        """The next client, non-blocking; raises BlockingIOError when there is none."""
        assert self.sock is not None, "the listener is closed"
        client, _ = self.sock.accept()
        client.setblocking(False)
        return client

    @property
    def closed(self) -> bool:
        return self.sock is None

    def close(self) -> None:
        """Stop listening and remove the file if it is still ours. Idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._identity is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.path)
            except OSError:
                pass
            self._identity = None
