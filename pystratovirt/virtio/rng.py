"""virtio-rng (device id 4, virtio 1.x §5.4): entropy for the guest from a host random source,
with StratoVirt's (and QEMU's) rate limit.

Owns: the random source (:class:`RngSource`: a file opened once, read-only -- ``/dev/urandom``
usually), the one request queue, the rate limit, and the device's counters (:class:`RngStats`).

Requests. The driver posts device-writable buffers; the device fills them from the source and
returns each chain with the number of bytes written. At most :data:`MAX_REQUEST` bytes go into
one chain (Linux asks for 64 at a time), so a chain claiming gigabytes costs nothing but a
partial fill. A chain with no device-writable buffer (the spec forbids it) is returned with
length 0; device-readable buffers are ignored. The bytes are read from the source straight into
guest memory (``readv`` on views of the buffers), never through a Python copy.

Rate limit: at most ``max_bytes`` every ``period_ms`` milliseconds. A period starts when its
first bytes are served; a timer on the device's I/O thread ends it and refills the budget. A
request is never answered with more bytes than the budget has left (it gets a partial fill);
when the budget is used up the device stops serving -- chains wait, popped, until the period
turns -- and resumes from the timer. The budget belongs to the device, not to the driver: a
driver reset does not refill it (otherwise a guest could reset its way past the limit).

A source that would block (``/dev/random`` before the host's pool is ready, a FIFO) is watched
on the I/O thread and serving resumes when it is readable; one whose read fails (a broken
``/dev/hwrng``) is tried again every second; a source that reaches its end (a regular file, a
FIFO whose writer left) stops serving for good (logged once): recycling bytes would not be
random.

Threading (see device.py): everything runs on the device's I/O thread -- the queue (``self.lock``
held, from the transport), the period timer and the source watch (which take the lock). Only
:meth:`VirtioRng.process_queue` pops chains, so a malformed ring raises QueueError where the
transport turns it into DEVICE_NEEDS_RESET; the timer and the source watch only serve chains
already popped and validated.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..errors import PyStratoVirtError
from ..memory.guest import GuestMemory
from ..util.eventloop import EPOLLIN, Timer
from .device import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, Interrupt, VirtioDevice, VirtioState, bit
from .queue import DescChain, SplitQueue, split_buffers

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 256
#: Bytes put into one chain at most, whatever its buffers claim.
MAX_REQUEST = 64 * 1024
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
RETRY_AFTER_ERROR = 1.0   # seconds before a source that failed a read is tried again


class RngError(PyStratoVirtError):
    """The random source cannot be used, or the rate limit is not a limit."""


class RngSource:
    """A host file read for random bytes: opened once, read-only, non-blocking.

    Character devices (``/dev/urandom``, ``/dev/random``, ``/dev/hwrng``), FIFOs and regular
    files are accepted; anything else, or a file that cannot be opened or read, is an
    :class:`RngError` naming the path and the reason.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RngError(f"The random source '{path}' does not exist.") from None
        except OSError as err:
            raise RngError(f"The random source '{path}' cannot be opened: {err.strerror or err}.") from None
        except (ValueError, UnicodeError) as err:
            raise RngError(f"The random source '{path}' cannot be opened: {err}.") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
                raise RngError(f"The random source '{path}' is not a character device, FIFO or "
                               "regular file.")
            try:
                os.read(fd, 0)   # what a directory or a write-only device refuses
            except BlockingIOError:
                pass
            except OSError as err:
                raise RngError(f"The random source '{path}' cannot be read: {err.strerror or err}.") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.regular = stat.S_ISREG(mode)

    def readv(self, views: list[memoryview]) -> int:
        """Fill ``views`` as far as the source gives now (BlockingIOError: nothing yet)."""
        return os.readv(self.fd, views)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class RngStats:
    """The device's counters: chains answered, random bytes given, how often the budget ran out."""

    requests: int = 0
    bytes: int = 0
    throttled: int = 0


@dataclass(frozen=True)
class RngState:
    """virtio-rng as a value (for snapshots): the virtio base state. Requests waiting for bytes
    (for the budget or the source) are given back to the ring (:meth:`VirtioRng.unfinished_chains`)
    and served again after the restore. The source, the limit and the counters are host-side:
    the restored device has the new command line's, and its budget starts full (a new process
    starts a new period; the limit is host policy, not guest state)."""

    virtio: VirtioState


class VirtioRng(VirtioDevice):
    """A virtio-rng fed from ``source`` (the device owns it), at most ``max_bytes`` every
    ``period_ms`` milliseconds (``max_bytes`` None: no limit)."""

    device_id = VIRTIO_ID_RNG
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, source: RngSource, *, max_bytes: int | None = None, period_ms: int = 1000,
                 name: str = "rng"):
        super().__init__(name)
        if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes <= 0):
            raise RngError(f"The rng limit max-bytes={max_bytes} must be a positive number of bytes.")
        if isinstance(period_ms, bool) or period_ms <= 0:
            raise RngError(f"The rng period={period_ms} must be a positive number of milliseconds.")
        self.source = source
        self.max_bytes = max_bytes
        self.period = period_ms / 1000
        self._budget = max_bytes          # bytes left in this period (None: unlimited)
        self._period_timer: Timer | None = None
        self._pending: deque[DescChain] = deque()   # popped, waiting for bytes
        self._source_watched = False
        self._retry_timer: Timer | None = None
        self._exhausted = False
        self._stats = RngStats()
        self._logged: set[str] = set()

    def device_features(self) -> int:
        return super().device_features() | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)

    @property
    def stats(self) -> RngStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    @property
    def waiting(self) -> int:
        """Chains the driver posted that wait for bytes (the budget or the source)."""
        return len(self._pending)

    # -- lifecycle (lock held) -------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: Sequence[SplitQueue | None], interrupt: Interrupt,
                 features: int) -> None:
        super().activate(mem, queues, interrupt, features)
        log.info("%s: driver ready (source %s, %s)", self.name, self.source.path,
                 "no limit" if self.max_bytes is None
                 else f"at most {self.max_bytes} bytes per {self.period * 1000:g} ms")

    def reset(self) -> None:
        self._pending.clear()
        self._watch_source(False)
        super().reset()

    def close(self) -> None:
        """Close the source (the I/O thread is already stopped)."""
        with self.lock:
            for timer in (self._period_timer, self._retry_timer):
                if timer is not None:
                    timer.cancel()
            self._period_timer = self._retry_timer = None
            self._pending.clear()
            self._watch_source(False)
            self.source.close()
        s = self._stats
        log.info("%s: served %d requests, %d bytes (budget ran out %d times)", self.name,
                 s.requests, s.bytes, s.throttled)

    # -- state as a value (lock held) -------------------------------------------------------------
    def unfinished_chains(self, index: int) -> int:
        # Served oldest first, so the waiting chains are the last ones popped.
        return len(self._pending) if index == 0 else 0

    def save_state(self) -> RngState:
        """The device's state (lock held, device quiet)."""
        return RngState(self.save_virtio_state())

    def restore_state(self, state: object, mem: GuestMemory, interrupt: Interrupt) -> None:
        """Take back a saved state (lock held, inactive, I/O thread not started); the requests
        that were waiting are popped again when the machine notifies the queue."""
        if not isinstance(state, RngState):
            raise ValueError(f"{self.name} is an rng; the saved state is a {type(state).__name__}")
        self.restore_virtio_state(state.virtio, mem, interrupt)

    # -- requests --------------------------------------------------------------------------------
    def process_queue(self, index: int) -> bool:  # lock held
        queue = self.queue(index)
        if queue is None:
            return False
        while (chain := queue.pop()) is not None:
            self._pending.append(chain)
        self._serve(queue)
        return False

    def _serve(self, queue: SplitQueue) -> None:  # lock held
        served = 0
        while self._pending and not self._exhausted:
            if self._budget == 0:
                self._stats.throttled += 1
                break   # the period timer resumes
            chain = self._pending[0]
            n: int | None  # bytes served; None: the source would block
            if not chain.writable:
                self._once("no-writable", "%s: request %d has no device-writable buffer; returned "
                           "empty", self.name, chain.head)
                n = 0
            else:
                n = self._fill(chain)
                if n is None:
                    break   # the source has nothing now: its watch resumes
            self._pending.popleft()
            queue.add_used(chain.head, n)
            served += 1
            self._stats.requests += 1
            self._stats.bytes += n
            if n and self._budget is not None:
                self._budget -= n
                self._start_period()
            if self._stats.requests == 1:
                log.info("%s: first request served (%d bytes)", self.name, n)
        if served:
            self.notify_used(queue)

    def _fill(self, chain: DescChain) -> int | None:
        """Read random bytes into the chain's writable buffers; None if the source would block."""
        want = min(chain.writable_len, MAX_REQUEST)
        if self._budget is not None:
            want = min(want, self._budget)
        bufs, _ = split_buffers(chain.writable, want)
        views = [self.mem.view(addr, length) for addr, length in bufs if length][:IOV_MAX]
        try:
            if not views:
                return 0
            n = self.source.readv(views)
        except BlockingIOError:
            self._watch_source(True)
            return None
        except OSError as exc:
            # A failing source (a broken /dev/hwrng) is tried again a second later, never in a
            # loop: it would be "readable" to epoll at once.
            self._once("read-error", "%s: reading %s failed (%s); requests wait, retried every "
                       "second", self.name, self.source.path, exc.strerror or exc)
            self._retry_later(RETRY_AFTER_ERROR)
            return None
        finally:
            for v in views:
                v.release()
        if n == 0:
            self._exhausted = True
            log.warning("%s: the random source %s reached its end; the device serves no more "
                        "bytes", self.name, self.source.path)
            return None
        return n

    # -- the rate limit's period (I/O thread) ----------------------------------------------------
    def _start_period(self) -> None:  # lock held
        if self._period_timer is None and self.io is not None:
            self._period_timer = self.io.call_later(self.period, self._period_ended)

    def _period_ended(self) -> None:
        with self.lock:
            self._period_timer = None
            self._budget = self.max_bytes
            self._resume()

    def _resume(self) -> None:  # lock held
        queue = self.queue(0)
        if queue is not None and not self.needs_reset:
            self._serve(queue)

    # -- a source that would block (I/O thread) --------------------------------------------------
    def _watch_source(self, on: bool) -> None:  # lock held
        io = self.io
        if io is None or on == self._source_watched or self.source.fd < 0:
            return
        if on:
            try:
                io.register(self.source.fd, EPOLLIN, self._source_ready)
            except PermissionError:   # cannot be polled (a regular file never blocks anyway)
                self._retry_later(RETRY_AFTER_ERROR)
                return
        else:
            io.unregister(self.source.fd)
        self._source_watched = on

    def _source_ready(self, _mask: int) -> None:
        with self.lock:
            self._watch_source(False)
            self._resume()

    def _retry_later(self, delay: float) -> None:  # lock held
        if self._retry_timer is None and self.io is not None:
            self._retry_timer = self.io.call_later(delay, self._retry)

    def _retry(self) -> None:
        with self.lock:
            self._retry_timer = None
            self._resume()

    def _once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg + " (logged once)", *args)
