"""The one epoll event loop of the program: the control plane's, and every device I/O thread's.

A loop watches descriptors (registered with a callback), runs timers (:meth:`EventLoop.call_later`)
and work handed to it by other threads (:meth:`EventLoop.call_soon_threadsafe`). Callbacks run on
the loop's thread, one at a time, so state that only the loop's callbacks touch needs no lock.
What to do with a ready descriptor (accept, drain an eventfd, read a tap) is the callback's
business: the loop never reads a descriptor itself. A callback that raises is logged and the loop
keeps running; the descriptor stays registered.

Two ways to run one (see ``docs/design.md``, "Threads"):

* the **control loop** runs on the main thread: ``loop.run()`` until ``loop.stop()``; it owns the
  QMP socket, the console's stdin, the machine's timers and every machine state change;
* a **device I/O thread** (Cloud Hypervisor's ``EpollHelper``): ``loop.start(name)`` runs it on
  a new thread; virtio transports register their queue-notify eventfds, devices their own
  descriptors (a NIC's tap) and timers (the balloon's statistics poll); ``loop.stop()`` ends and
  joins it. Devices that name the same ``iothread`` share one.

Every method may be called from any thread.
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
from collections.abc import Callable

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLHUP = select.EPOLLHUP
EPOLLERR = select.EPOLLERR
EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)

EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC

Callback = Callable[[int], object]  # what it returns is ignored


class Timer:
    """A pending :meth:`EventLoop.call_later`; :meth:`cancel` stops it from running."""

    __slots__ = ("when", "seq", "fn", "cancelled")

    def __init__(self, when: float, seq: int, fn: Callable[[], object]):
        self.when, self.seq, self.fn, self.cancelled = when, seq, fn, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class EventLoop:
    """``poll_after``: seconds the loop keeps polling its descriptors (epoll_wait without a
    timeout, the GIL released in each call) after it last handled one, before it sleeps. A device
    I/O thread uses it: a driver that is kept busy re-posts buffers within microseconds, and on
    hosts where waking a sleeping thread costs tens of microseconds (an IPI; this project's nested
    host), that wake-up, not the device, would set the pace. 0 (the control loop) sleeps at once.
    """

    def __init__(self, name: str = "control", poll_after: float = 0.0) -> None:
        self.name = name
        self.poll_after = poll_after
        self._epoll = select.epoll()
        self._handlers: dict[int, Callback] = {}
        self._wake = os.eventfd(0, EFD_FLAGS)
        self._epoll.register(self._wake, EPOLLIN)
        self._lock = threading.Lock()   # the pending queue and the timer heap
        self._pending: deque[Callable[[], object]] = deque()
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._running = False
        self._thread: threading.Thread | None = None  # set by start()
        self._closed = False
        self._signal_pipe: tuple[int, int] | None = None  # see wake_on_signals
        self.thread_id: int | None = None

    # -- registration ---------------------------------------------------------------------------
    def register(self, fd: int, events: int, callback: Callback) -> None:
        """Call ``callback(event_mask)`` on the loop thread whenever ``fd`` is ready."""
        self._handlers[fd] = callback
        try:
            self._epoll.register(fd, events)
        except BaseException:
            del self._handlers[fd]
            raise

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd`` (before its owner closes it); an unknown fd is ignored."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def is_registered(self, fd: int) -> bool:
        return fd in self._handlers

    # -- deferred work --------------------------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop thread as soon as it is free."""
        with self._lock:
            self._pending.append(fn)
        self._kick()

    def call_later(self, delay: float, fn: Callable[[], object]) -> Timer:
        """Run ``fn`` on the loop thread after ``delay`` seconds (unless cancelled)."""
        timer = Timer(time.monotonic() + max(0.0, delay), next(self._seq), fn)
        with self._lock:
            heapq.heappush(self._timers, timer)
            first = self._timers[0] is timer
        if first and not self.in_loop_thread():
            self._kick()  # the loop may be sleeping past this timer's deadline
        return timer

    def wake_on_signals(self) -> None:
        """Make every signal with a Python handler wake the loop (main thread only).

        The kernel may deliver a process-directed signal such as SIGTERM to any thread (it
        prefers the main thread, but not while that one is stopped or already has a signal
        pending). Python runs the handler only on the main thread, and only once it returns to
        Python code; with the loop asleep in epoll_wait that could be never. The C-level handler
        writes the signal number to this wake-up pipe from whichever thread took the signal.
        """
        if self._signal_pipe is not None:
            return
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # the handler writes one byte
        self._signal_pipe = (read_fd, write_fd)

        def drain(_mask: int) -> None:
            try:
                while os.read(read_fd, 4096):
                    pass
            except BlockingIOError:
                pass
        self.register(read_fd, EPOLLIN, drain)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self.thread_id

    def _kick(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:  # closed: the loop is gone and nobody will run the work
            pass

    # -- running --------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the loop on the calling thread until :meth:`stop`."""
        self.thread_id = threading.get_ident()
        self._running = True
        poll_after = self.poll_after
        if poll_after <= 0:
            while self._running:
                self.run_once(self._next_timeout())
            return
        busy_until = 0.0
        monotonic = time.monotonic
        while self._running:
            timeout = self._next_timeout()
            if timeout != 0 and monotonic() < busy_until:
                timeout = 0
            if self.run_once(timeout):
                busy_until = monotonic() + poll_after

    def start(self, on_start: Callable[[], None] | None = None) -> None:
        """Run the loop on a new thread named after the loop; ``on_start`` runs first on it
        (the machine installs the thread's seccomp filter there)."""
        if self._thread is not None:
            raise RuntimeError(f"event loop {self.name} was already started")

        def main() -> None:
            if on_start is not None:
                on_start()
            self.run()
        self._running = True  # stop() before the thread gets going must still end it
        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread.is_alive() if thread is not None else self._running

    def stop(self, timeout: float | None = None) -> bool:
        """Make :meth:`run` return (safe from any thread). For a loop started with :meth:`start`,
        also join its thread (a callback in progress finishes first); False if it did not end
        within ``timeout``."""
        def _stop() -> None:
            self._running = False
        self.call_soon_threadsafe(_stop)
        thread = self._thread
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("I/O thread %s did not stop within %s s", self.name, timeout)
            return False
        return True

    def _next_timeout(self) -> float:
        with self._lock:
            if self._pending:
                return 0
            while self._timers and self._timers[0].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return -1
            return max(0.0, self._timers[0].when - time.monotonic())

    def run_once(self, timeout: float = -1) -> int:
        """Wait up to ``timeout`` seconds (-1: until something happens), handle what is ready and
        what is due; returns how many descriptors were handled."""
        try:
            ready = self._epoll.poll(timeout)
        except InterruptedError:
            ready = []
        for fd, mask in ready:
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                continue
            handler = self._handlers.get(fd)
            if handler is not None:
                self._guard(handler, mask)
        self._run_due()
        return len(ready)

    def _run_due(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if self._pending:
                    fn = self._pending.popleft()
                elif self._timers and (self._timers[0].cancelled or self._timers[0].when <= now):
                    timer = heapq.heappop(self._timers)
                    if timer.cancelled:
                        continue
                    fn = timer.fn
                else:
                    return
            # _guard calls the lambda before the next iteration rebinds fn.
            self._guard(lambda _mask: fn(), 0)  # noqa: B023

    def _guard(self, handler: Callback, mask: int) -> None:
        try:
            handler(mask)
        except Exception:  # a faulty handler must not take the loop (or the VMM) down
            log.exception("%s: event loop callback failed", self.name)

    def close(self) -> None:
        """Release the loop's own descriptors (after it has stopped). Idempotent."""
        if not self._closed:
            self._closed = True
            if self._signal_pipe is not None:
                signal.set_wakeup_fd(-1)
                for fd in self._signal_pipe:
                    os.close(fd)
                self._signal_pipe = None
            self._epoll.close()
            os.close(self._wake)
