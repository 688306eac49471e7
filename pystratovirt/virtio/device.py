"""The transport-independent side of a virtio device: the VirtioDevice base class, the interrupt
object a device signals the driver through, and the I/O thread that runs a device's queues.

Threading model (one rule per actor, so that disk I/O never blocks a vCPU or the control loop):

* Each transport owns one :class:`IoThread`. It sleeps in epoll on the queues' notify eventfds
  (KVM signals them on a guest write to QueueNotify; the transport signals them itself when that
  write arrives as an MMIO exit) and calls ``device.process_queue(index)`` with ``device.lock``
  held. All queue processing, and so all backend I/O, happens on that thread.
* vCPU threads only touch registers. Activating or resetting the device (Status writes) takes
  ``device.lock``, so it waits for the request in flight and never races with it.
* The control loop (QMP: hot-replace) takes ``device.lock`` to swap backends, so requests in
  flight finish on the old backend first.
* Device configuration bytes and the ConfigGeneration counter change together under a separate
  short lock (``_config_lock``), never held across I/O, so config reads from vCPUs never wait
  for the disk.

Lock order: transport register lock -> ``device.lock`` -> ``_config_lock`` -> the interrupt's
lock. Nothing takes them in another order.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable, Sequence

from ..memory.guest import GuestMemory
from ..util import seccomp
from .queue import SplitQueue

log = logging.getLogger(__name__)

# Feature bits (spec §6, "Reserved Feature Bits").
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# Device status bits (spec §2.1).
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# InterruptStatus bits (virtio-mmio; the same two events exist on every transport).
INT_VRING = 0x1
INT_CONFIG = 0x2

EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


def bit(n: int) -> int:
    return 1 << n


class Interrupt:
    """The device's interrupt: pending-event bits plus an eventfd the machine binds to the
    device's GSI with KVM_IRQFD (each eventfd write injects one edge).

    Bits stay set until the driver acknowledges them (InterruptACK). Every signal writes the
    eventfd again even if the bit was already set: with an edge-triggered line the driver may
    already have read the status, and a lost edge would be a lost completion.
    """

    def __init__(self) -> None:
        self.eventfd = os.eventfd(0, EFD_FLAGS)
        self._status = 0
        self._lock = threading.Lock()

    @property
    def status(self) -> int:
        return self._status

    def _signal(self, bits: int) -> None:
        with self._lock:
            self._status |= bits
            fd = self.eventfd
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError:  # closed during shutdown, or the counter is saturated: the edge is pending anyway
                pass

    def signal_used(self) -> None:
        self._signal(INT_VRING)

    def signal_config(self) -> None:
        self._signal(INT_CONFIG)

    def ack(self, bits: int) -> None:
        with self._lock:
            self._status &= ~bits

    def reset(self) -> None:
        with self._lock:
            self._status = 0

    def close(self) -> None:
        with self._lock:
            fd, self.eventfd = self.eventfd, -1
        if fd >= 0:
            os.close(fd)


class VirtioDevice:
    """Base class of device models; a transport drives it.

    Subclasses set ``device_id`` and ``queue_max_sizes`` and implement ``process_queue``; they
    keep their config space in ``self._config`` (little-endian bytes) and change it only through
    :meth:`_update_config`, which bumps the generation and tells an active driver.

    Methods marked "lock held" are called by the transport or the I/O thread with
    ``self.lock`` held.
    """

    device_id: int = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        self._config_lock = threading.Lock()
        self._config = bytearray()
        self._config_generation = 0
        self.mem: GuestMemory | None = None
        self.queues: list[SplitQueue | None] = []
        self.interrupt: Interrupt | None = None
        self.driver_features = 0
        self.active = False

    # -- features --------------------------------------------------------------------------------
    def device_features(self) -> int:
        """Feature bits offered to the driver; always includes VIRTIO_F_VERSION_1."""
        return bit(VIRTIO_F_VERSION_1)

    def negotiated(self, feature_bit: int) -> bool:
        return bool(self.driver_features & bit(feature_bit))

    # -- configuration space ---------------------------------------------------------------------
    @property
    def config_generation(self) -> int:
        return self._config_generation

    def read_config(self, offset: int, size: int) -> int:
        """Little-endian read of ``size`` bytes at ``offset``; bytes past the end read as 0."""
        with self._config_lock:
            data = bytes(self._config[offset:offset + size]) if offset >= 0 else b""
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Driver write to config space; read-only by default (ignored)."""

    def _update_config(self, offset: int, data: bytes) -> None:
        """Change config bytes and the generation together; tell an active driver (config IRQ)."""
        with self._config_lock:
            end = offset + len(data)
            if end > len(self._config):
                self._config.extend(bytes(end - len(self._config)))
            self._config[offset:end] = data
            self._config_generation = (self._config_generation + 1) & 0xFFFF_FFFF
        interrupt = self.interrupt
        if self.active and interrupt is not None:
            interrupt.signal_config()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the device's own threads, if it has any (the transport calls this from its
        ``start``, on the main thread, before the machine installs its seccomp filter: a thread
        created later would inherit that filter)."""

    # -- lifecycle (lock held) -------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: Sequence[SplitQueue | None], interrupt: Interrupt,
                 features: int) -> None:
        """The driver set DRIVER_OK: start serving ``queues`` (None where a queue is not ready)."""
        self.mem = mem
        self.queues = list(queues)
        self.interrupt = interrupt
        self.driver_features = features
        self.active = True

    def reset(self) -> None:
        """The driver reset the device: forget the queues and negotiated features."""
        self.active = False
        self.release_queues()
        self.driver_features = 0

    def release_queues(self) -> None:
        """Drop the queues and their views of guest RAM (lock held)."""
        queues, self.queues = self.queues, []
        for queue in queues:
            if queue is not None:
                queue.close()

    def process_queue(self, index: int) -> bool:
        """Serve the available chains of queue ``index``; True if it stopped early with more to do.

        Raises QueueError for a malformed queue; must not raise anything else for guest input.
        """
        raise NotImplementedError

    def serve_batch(self, queue: SplitQueue, handle, batch: int = 32) -> bool:
        """Pop up to ``batch`` chains, complete each with ``handle(chain)`` (the bytes written
        into its device-writable buffers) and notify the driver once; True if more may wait.
        Bounding the batch keeps one busy queue from starving the device's other queues."""
        handled = 0
        while handled < batch:
            chain = queue.pop()
            if chain is None:
                break
            queue.add_used(chain.head, handle(chain))
            handled += 1
        if handled:
            self.notify_used(queue)
        return handled >= batch

    def notify_used(self, queue: SplitQueue) -> None:
        """Raise a used-buffer interrupt if the driver's suppression settings want one."""
        if self.interrupt is not None and queue.needs_notification():
            self.interrupt.signal_used()

    def close(self) -> None:
        """Release host resources (the transport's I/O thread is already stopped)."""


class IoThread:
    """A thread that waits on ``(eventfd, queue_index)`` pairs and calls ``handler(index)``.

    The eventfd is drained before the handler runs, so a notification that arrives while the
    handler works re-arms the fd and is not lost. ``stop()`` wakes the thread through its own
    eventfd and joins it.
    """

    def __init__(self, name: str, fds: Sequence[tuple[int, int]], handler: Callable[[int], None]):
        self.name = name
        self._fds = list(fds)
        self._handler = handler
        self._stop_fd = os.eventfd(0, EFD_FLAGS)
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"I/O thread {self.name} was already started")
        epoll = select.epoll()
        epoll.register(self._stop_fd, select.EPOLLIN)
        for fd, _ in self._fds:
            epoll.register(fd, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, args=(epoll,), name=self.name, daemon=True)
        self._thread.start()

    def _run(self, epoll: select.epoll) -> None:
        index_of = dict(self._fds)
        try:
            seccomp.install(seccomp.ThreadKind.IO)  # before the first epoll_wait
            while True:
                try:
                    events = epoll.poll()
                except InterruptedError:
                    continue
                for fd, _mask in events:
                    if fd == self._stop_fd:
                        return
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    try:
                        self._handler(index_of[fd])
                    except Exception:  # the handler contains device errors; this is a last resort
                        log.exception("%s: queue handler failed", self.name)
        finally:
            epoll.close()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop and join the thread; False if it did not end within ``timeout``."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            os.eventfd_write(self._stop_fd, 1)
            thread.join(timeout)
            if thread.is_alive():
                log.warning("I/O thread %s did not stop within %s s", self.name, timeout)
                return False
        return True

    def close(self) -> None:
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
