"""The transport-independent side of a virtio device: the VirtioDevice base class, the value
that says whether (and how) a driver activated it, and the interrupt object a device signals the
driver through.

Threading model (one rule per actor, so that disk I/O never blocks a vCPU or the control loop):

* Each device has an I/O thread, an :class:`~pystratovirt.util.eventloop.EventLoop` given to it
  by its transport as ``device.io`` (its own, or a named ``iothread`` several devices share).
  The transport registers the queues' notify eventfds there (KVM signals them on a guest write to
  QueueNotify; the transport signals them itself when that write arrives as an MMIO exit) and
  calls ``device.process_queue(index)`` with ``device.lock`` held. The device registers its own
  descriptors (a NIC's tap) and timers (the balloon's statistics poll) on the same loop. All
  queue processing, and so all backend I/O, happens on that thread.
* vCPU threads only touch registers. Activating or resetting the device (Status writes) takes
  ``device.lock``, so it waits for the request in flight and never races with it.
* The control loop (QMP: hot-replace) hands backend swaps to the device's I/O thread, so
  requests in flight finish on the old backend first and the control loop never waits for a disk.
* Device configuration bytes and the ConfigGeneration counter change together under a separate
  short lock (``_config_lock``), never held across I/O, so config reads from vCPUs never wait
  for the disk.

Lock order: transport register lock -> ``device.lock`` -> ``_config_lock`` -> the interrupt's
lock. Nothing takes them in another order.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from ..memory.guest import GuestMemory
from ..util.eventloop import EFD_FLAGS, EventLoop
from .queue import DescChain, QueueState, SplitQueue

log = logging.getLogger(__name__)

T = TypeVar("T")

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

    def restore(self, bits: int) -> None:
        """Take back saved pending bits without signalling: the guest's interrupt controller
        state, restored separately, already says whether the edge was delivered."""
        with self._lock:
            self._status = bits

    def close(self) -> None:
        with self._lock:
            fd, self.eventfd = self.eventfd, -1
        if fd >= 0:
            os.close(fd)


@dataclass(frozen=True)
class ActiveState:
    """What a device runs with while a driver has it activated (DRIVER_OK): guest memory, the
    queues (None where the driver left one not ready), the interrupt and the negotiated features.
    A device either has one of these or is inactive; the two cannot disagree."""

    mem: GuestMemory
    queues: tuple[SplitQueue | None, ...]
    interrupt: Interrupt
    features: int


@dataclass(frozen=True)
class VirtioState:
    """What every virtio device holds for its driver, as a value (for snapshots): the config
    space bytes and ConfigGeneration, whether DEVICE_NEEDS_RESET is set, and -- while a driver
    has it activated -- the negotiated features and each queue (None where a queue was not
    ready). ``features`` is None for an inactive device, whose ``queues`` is empty."""

    config: bytes
    config_generation: int
    needs_reset: bool
    features: int | None
    queues: tuple[QueueState | None, ...]


class VirtioDevice:
    """Base class of device models; a transport drives it.

    Subclasses set ``device_id`` and ``queue_max_sizes`` and implement ``process_queue``; they
    keep their config space in ``self._config`` (little-endian bytes) and change it only through
    :meth:`_update_config`, which bumps the generation and tells an active driver.

    State: inactive (``state is None``) or activated (``state`` is an :class:`ActiveState`), plus
    ``needs_reset`` once the driver's queues turned out malformed (spec §2.1.2
    DEVICE_NEEDS_RESET): the device then stops using them until the driver resets it.

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
        self.state: ActiveState | None = None
        self.needs_reset = False
        self._failure_logged = False
        # The device's I/O thread, set by its transport (None in unit tests that drive a device
        # directly: timers and descriptors then are the test's business).
        self.io: EventLoop | None = None

    # -- state -----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state is not None

    @property
    def mem(self) -> GuestMemory:
        """Guest memory; only while active (lock held)."""
        assert self.state is not None, f"{self.name} is not active"
        return self.state.mem

    def queue(self, index: int) -> SplitQueue | None:
        """Queue ``index`` while active, else None (lock held)."""
        state = self.state
        if state is None or index >= len(state.queues):
            return None
        return state.queues[index]

    # -- features --------------------------------------------------------------------------------
    def device_features(self) -> int:
        """Feature bits offered to the driver; always includes VIRTIO_F_VERSION_1."""
        return bit(VIRTIO_F_VERSION_1)

    def negotiated(self, feature_bit: int) -> bool:
        state = self.state
        return state is not None and bool(state.features & bit(feature_bit))

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
        state = self.state
        if state is not None:
            state.interrupt.signal_config()

    # -- lifecycle (lock held) -------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: Sequence[SplitQueue | None], interrupt: Interrupt,
                 features: int) -> None:
        """The driver set DRIVER_OK: start serving ``queues`` (None where a queue is not ready).
        Subclasses extend it; raising QueueError refuses the activation (DEVICE_NEEDS_RESET)."""
        self.state = ActiveState(mem, tuple(queues), interrupt, features)

    def reset(self) -> None:
        """The driver reset the device: forget the queues, the negotiated features and the
        failure. Subclasses extend it with their own device state."""
        self.release()
        self.needs_reset = False
        self._failure_logged = False

    def release(self) -> None:
        """Drop the active state and with it every view of guest RAM (lock held): the transport
        calls this when it closes, after which guest memory may be unmapped."""
        state, self.state = self.state, None
        if state is not None:
            for queue in state.queues:
                if queue is not None:
                    queue.close()

    # -- state as a value (lock held) -------------------------------------------------------------
    def unfinished_chains(self, index: int) -> int:
        """How many chains of queue ``index`` the device has popped and not completed (they are
        given back to the ring in a saved state). Devices that hold chains override this."""
        return 0

    def save_virtio_state(self) -> VirtioState:
        """The base part of the device's state (lock held, device quiet). Subclasses wrap it in
        their own state value with ``save_state``."""
        with self._config_lock:
            config, generation = bytes(self._config), self._config_generation
        state = self.state
        if state is None:
            return VirtioState(config, generation, self.needs_reset, None, ())
        queues = tuple(None if q is None else q.save_state(self.unfinished_chains(i))
                       for i, q in enumerate(state.queues))
        return VirtioState(config, generation, self.needs_reset, state.features, queues)

    def save_state(self) -> object:
        """The device's state as a value (lock held, device quiet); devices with state of their
        own return their own value holding :meth:`save_virtio_state`'s."""
        return self.save_virtio_state()

    def restore_state(self, state: object, mem: GuestMemory, interrupt: Interrupt) -> None:
        """Take back what :meth:`save_state` gave (lock held, device inactive and quiet)."""
        if not isinstance(state, VirtioState):
            raise ValueError(f"{self.name}: the saved state is a {type(state).__name__}")
        self.restore_virtio_state(state, mem, interrupt)

    def restore_virtio_state(self, state: VirtioState, mem: GuestMemory, interrupt: Interrupt) -> None:
        """Take back a saved base state (lock held, device inactive and quiet): config bytes and
        generation, and -- for an activated device -- the queues, activated as the driver had
        them (no interrupt is raised: the guest already knows everything the state says).
        Raises ValueError or QueueError for a state this device cannot have had."""
        if len(state.config) != len(self._config):
            raise ValueError(f"{self.name}: config space of {len(state.config)} bytes, the device "
                             f"has {len(self._config)}")
        if not 0 <= state.config_generation <= 0xFFFF_FFFF:
            raise ValueError(f"{self.name}: config generation {state.config_generation} is not 32-bit")
        with self._config_lock:
            self._config[:] = state.config
            self._config_generation = state.config_generation
        self.release()
        if state.features is not None:
            if state.features & ~self.device_features():
                raise ValueError(f"{self.name}: negotiated features {state.features:#x} include bits "
                                 f"the device does not offer ({self.device_features():#x})")
            if len(state.queues) != len(self.queue_max_sizes):
                raise ValueError(f"{self.name}: {len(state.queues)} queues, the device has "
                                 f"{len(self.queue_max_sizes)}")
            queues = []
            for index, (qstate, max_size) in enumerate(zip(state.queues, self.queue_max_sizes, strict=True)):
                if qstate is not None and qstate.size > max_size:
                    raise ValueError(f"{self.name}: queue {index} of {qstate.size} entries, more "
                                     f"than its maximum {max_size}")
                queues.append(None if qstate is None else SplitQueue.from_state(mem, qstate))
            self.activate(mem, queues, interrupt, state.features)
        elif state.queues:
            raise ValueError(f"{self.name}: an inactive device with queues")
        self.needs_reset = state.needs_reset

    def fail(self, reason: str) -> None:
        """Mark DEVICE_NEEDS_RESET (lock held); the transport tells the driver."""
        if not self._failure_logged:
            self._failure_logged = True
            log.error("virtio device %s needs a reset: %s; it stops processing until the driver "
                      "resets it", self.name, reason)
        self.needs_reset = True

    def process_queue(self, index: int) -> bool:
        """Serve the available chains of queue ``index``; True if it stopped early with more to do.

        Raises QueueError for a malformed queue; must not raise anything else for guest input.
        """
        raise NotImplementedError

    def serve_batch(self, queue: SplitQueue, handle: Callable[[DescChain], int], batch: int = 32) -> bool:
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
        state = self.state
        if state is not None and queue.needs_notification():
            state.interrupt.signal_used()

    def on_io_thread(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the device's I/O thread, after the work in progress there (so a backend
        swap never races a request), and return its future; inline when the I/O thread is not
        running or this is it. Control-plane changes to a device go through here."""
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        io = self.io
        if io is None or not io.running or io.in_loop_thread():
            run()
        else:
            io.call_soon_threadsafe(run)
        return future

    def attach_io(self, io: EventLoop) -> None:
        """The transport gives the device its I/O thread (before that thread runs). A device
        with descriptors that must be watched from the start, whatever the driver does (a
        console's chardev: its socket accepts clients before the guest's driver is up),
        extends this to register them on ``io``."""
        self.io = io

    def close(self) -> None:
        """Release host resources (the I/O thread is already stopped)."""
