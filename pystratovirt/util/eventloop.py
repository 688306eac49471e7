"""The control plane's single epoll event loop.

File descriptors (QMP sockets, ioeventfds, tap fds, timerfds) are registered with a callback that
runs on the loop's thread. Other threads (vCPU threads, signal handlers) hand work to the loop with
:meth:`EventLoop.call_soon_threadsafe`; timers run with :meth:`EventLoop.call_later`. A callback
that raises is logged and unregistered from nothing else: the loop keeps running.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLHUP = select.EPOLLHUP
EPOLLERR = select.EPOLLERR
EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)

Callback = Callable[[int], None]


class Timer:
    """A pending call_later; cancel() stops it from running."""

    __slots__ = ("when", "seq", "fn", "cancelled")

    def __init__(self, when: float, seq: int, fn: Callable[[], None]):
        self.when, self.seq, self.fn, self.cancelled = when, seq, fn, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Timer") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class EventLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Callback] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, EPOLLIN)
        self._pending: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._running = False
        self.thread_id: int | None = None

    # -- registration ---------------------------------------------------------------------------
    def register(self, fd: int, events: int, callback: Callback) -> None:
        """Call ``callback(event_mask)`` on the loop thread whenever ``fd`` is ready."""
        self._epoll.register(fd, events)
        self._handlers[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def is_registered(self, fd: int) -> bool:
        return fd in self._handlers

    # -- deferred work --------------------------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(fn)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is already due to wake

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` on the loop after ``delay`` seconds. Call only from the loop thread."""
        timer = Timer(time.monotonic() + max(0.0, delay), next(self._seq), fn)
        heapq.heappush(self._timers, timer)
        return timer

    def wake_on_signals(self) -> None:
        """Make every signal with a Python handler wake the loop (main thread only).

        The kernel may deliver a process-directed signal such as SIGTERM to any thread (it
        prefers the main thread, but not while that one is stopped or already has a signal
        pending). Python runs the handler only on the main thread, and only once it returns to
        Python code; with the loop asleep in epoll_wait that could be never. The C-level handler
        writes the signal number to this wake-up pipe from whichever thread took the signal.
        """
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self.thread_id

    # -- running --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Make run() return; safe from any thread."""
        def _stop() -> None:
            self._running = False
        self.call_soon_threadsafe(_stop)

    def run(self) -> None:
        self.thread_id = threading.get_ident()
        self._running = True
        while self._running:
            self.run_once(self._next_timeout())

    def _next_timeout(self) -> float:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return -1
        return max(0.0, self._timers[0].when - time.monotonic())

    def run_once(self, timeout: float = -1) -> None:
        try:
            ready = self._epoll.poll(timeout)
        except InterruptedError:
            ready = []
        for fd, mask in ready:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            handler = self._handlers.get(fd)
            if handler is not None:
                self._guard(handler, mask)
        self._run_pending()
        now = time.monotonic()
        while self._timers and (self._timers[0].cancelled or self._timers[0].when <= now):
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guard(lambda _mask, fn=timer.fn: fn(), 0)

    def _run_pending(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                fn = self._pending.popleft()
            self._guard(lambda _mask, fn=fn: fn(), 0)

    @staticmethod
    def _guard(handler: Callback, mask: int) -> None:
        try:
            handler(mask)
        except Exception:  # a faulty handler must not take the control plane down
            log.exception("event loop callback failed")

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
