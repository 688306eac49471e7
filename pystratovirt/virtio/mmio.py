"""The virtio-mmio transport, register layout version 2 (virtio 1.x §4.2), as an MMIO bus device.

Owns: the control registers (feature negotiation with the FEATURES_OK check, queue setup, status
and reset, interrupt status/ack, ConfigGeneration), delegating config space (offset 0x100) to the
device; the per-queue notify eventfds and their place on the device's I/O thread (its own
:class:`~pystratovirt.util.eventloop.EventLoop`, or a shared ``iothread`` the machine passes in).
DEVICE_NEEDS_RESET, when the driver's queues turn out malformed, is the device's state
(:meth:`~.device.VirtioDevice.fail`); the transport reports it in the Status register.

Version 2 only: Linux's virtio_mmio accepts version 1 and 2 and takes the modern path for 2
(Linux 6.1 included), so the legacy page-based layout is not implemented.

VendorID reads 0, as StratoVirt's does: the spec gives the value no meaning for virtio-mmio,
Linux matches drivers on any vendor, and a guest looking at ``/sys/bus/virtio/devices/*/vendor``
sees what it would see under StratoVirt.

How the machine wires one transport (see ``notify_eventfds``, ``irq_eventfd``, ``cmdline_entry``):
insert it on the MMIO bus at ``base`` for ``VIRTIO_MMIO_SIZE`` bytes, register each notify eventfd
with ``vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=index)``, bind ``irq_eventfd`` with
``vm.irqfd(fd, irq)``, add ``cmdline_entry(base, irq)`` to the kernel command line, ``start()``,
and ``close()`` at shutdown.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..memory.guest import GuestMemory
from ..memory.layout import VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE
from ..util.eventloop import EFD_FLAGS, EPOLLIN, EventLoop
from .device import (
    INT_CONFIG,
    INT_VRING,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Interrupt,
    VirtioDevice,
    bit,
)
from .queue import QueueError, SplitQueue

if TYPE_CHECKING:  # only for annotations: the machine passes its Vm in
    from ..kvm.vm import Vm

log = logging.getLogger(__name__)

MAGIC_VALUE = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR_ID = 0

# Register offsets.
MAGIC = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

_ADDR_REGS = {
    QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
    QUEUE_DRIVER_LOW: ("driver", 0), QUEUE_DRIVER_HIGH: ("driver", 32),
    QUEUE_DEVICE_LOW: ("device", 0), QUEUE_DEVICE_HIGH: ("device", 32),
}

# Transport features this implementation understands; a device may offer a subset of these
# plus its own device-specific bits (0..23).
TRANSPORT_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)


# How long a device's I/O thread keeps polling after it last had work before it sleeps (see
# EventLoop): about one wake-up of a thread on this project's nested host, where a wake-up costs
# 50-80 us; a driver that re-posts within that time is served without one.
IO_POLL = float(os.environ.get("PYSTRATOVIRT_IO_POLL_US", "100")) * 1e-6


def slot_resources(index: int) -> tuple[int, int]:
    """(MMIO base, IRQ) of virtio-mmio slot ``index`` in the micro-VM map (0xF0100000 + i*0x200, 5 + i)."""
    irq = VIRTIO_IRQ_FIRST + index
    if index < 0 or irq > VIRTIO_IRQ_LAST:
        raise ValueError(f"virtio-mmio slot {index} has no IRQ: only "
                         f"{VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1} are available")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE, irq


def cmdline_entry(base: int, irq: int, size: int = VIRTIO_MMIO_SIZE) -> str:
    """The kernel parameter announcing one device, e.g. ``virtio_mmio.device=512@0xf0100000:5``."""
    return f"virtio_mmio.device={size}@{base:#x}:{irq}"


@dataclass
class _QueueRegs:
    """What the driver programmed for one queue."""

    max_size: int
    num: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def reset(self) -> None:
        # QueueNum is write-only; start from the maximum in case a driver never writes it.
        self.num, self.ready, self.desc, self.driver, self.device = self.max_size, False, 0, 0, 0


@dataclass(frozen=True)
class QueueRegsState:
    """What the driver programmed for one queue (QueueNum, QueueReady and the three addresses)."""

    num: int
    ready: bool
    desc: int
    driver: int
    device: int


@dataclass(frozen=True)
class MmioState:
    """The transport's registers as a value (for snapshots): Status (without the device's
    NEEDS_RESET bit), the feature selectors, the driver's accepted features, QueueSel, each
    queue's registers, and the InterruptStatus bits the driver has not acknowledged yet. The
    device's own state (config space and generation, queues in use) is the device's value."""

    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    queues: tuple[QueueRegsState, ...]
    interrupt_status: int


class VirtioMmio:
    """One virtio-mmio window in front of one device (a BusDevice: ``read``/``write``).

    ``io``: the I/O thread to serve the device on. Without one the transport makes its own and
    starts, stops and closes it; a shared one (an ``iothread``) belongs to the caller, who
    starts it and stops it before :meth:`close`.
    """

    def __init__(self, device: VirtioDevice, mem: GuestMemory, *, name: str | None = None,
                 io: EventLoop | None = None):
        self.device = device
        self.mem = mem
        self.name = name or device.name
        self.interrupt = Interrupt()
        self._queues = [_QueueRegs(size) for size in device.queue_max_sizes]
        for q in self._queues:
            q.reset()
        self._own_io = io is None
        self.io = EventLoop(f"virtio-{self.name}", poll_after=IO_POLL) if io is None else io
        device.attach_io(self.io)
        self._notify_fds = [os.eventfd(0, EFD_FLAGS) for _ in self._queues]
        for index, fd in enumerate(self._notify_fds):
            def on_notify(_mask: int, fd: int = fd, index: int = index) -> None:
                self._on_notify(fd, index)
            self.io.register(fd, EPOLLIN, on_notify)
        self._lock = threading.Lock()   # the registers below; vCPU threads only
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._bad_access_logged = False
        self._closed = False

    # -- wiring for the machine ------------------------------------------------------------------
    def notify_eventfds(self) -> list[tuple[int, int]]:
        """(eventfd, queue index) pairs to register with KVM_IOEVENTFD at base + QUEUE_NOTIFY
        (4 bytes, datamatch = queue index)."""
        return [(fd, i) for i, fd in enumerate(self._notify_fds)]

    @property
    def irq_eventfd(self) -> int:
        """The eventfd to register with KVM_IRQFD on the device's GSI."""
        return self.interrupt.eventfd

    def kvm_attach(self, vm: Vm, base: int, irq: int) -> None:
        """Register this transport's eventfds with KVM: one KVM_IOEVENTFD per queue on
        ``base + QUEUE_NOTIFY`` (4 bytes, datamatch = queue index) and KVM_IRQFD on ``irq``."""
        for fd, index in self.notify_eventfds():
            vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=index)
        vm.irqfd(self.irq_eventfd, irq)

    def kvm_detach(self, vm: Vm, base: int, irq: int) -> None:
        """Undo :meth:`kvm_attach` (not needed when the whole VM is being closed)."""
        for fd, index in self.notify_eventfds():
            vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=index, deassign=True)
        vm.irqfd(self.irq_eventfd, irq, deassign=True)

    def start(self, on_start: Callable[[], None] | None = None) -> None:
        """Start the device's own I/O thread (a shared one is the caller's to start)."""
        if self._own_io:
            self.io.start(on_start)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop and join the device's own I/O thread (requests in flight complete first)."""
        return self.io.stop(timeout) if self._own_io else True

    def close(self, timeout: float | None = None) -> None:
        """Stop the I/O thread, close the device (a block device flushes), release the eventfds.

        Deassign the ioeventfds/irqfd in KVM first if the VM lives on; if the VM is being torn
        down, closing our copies is enough (KVM holds its own references).
        """
        if self._closed:
            return
        self._closed = True
        self.stop(timeout)
        for fd in self._notify_fds:
            self.io.unregister(fd)
        if self._own_io:
            self.io.close()
        with self.device.lock:
            self.device.release()  # guest memory may be unmapped after this
        self.device.close()
        for fd in self._notify_fds:
            os.close(fd)
        self._notify_fds = []
        self.interrupt.close()

    @property
    def needs_reset(self) -> bool:
        return self.device.needs_reset

    # -- state as a value ------------------------------------------------------------------------
    def save_state(self) -> MmioState:
        """The registers as a value. The machine calls it with the vCPUs paused, so no register
        access is in flight and the register lock is not needed (taking it here, with the
        device lock held for quiescing, would invert the lock order), and the device quiet."""
        return MmioState(self._status, self._device_features_sel, self._driver_features_sel,
                         self._driver_features, self._queue_sel,
                         tuple(QueueRegsState(q.num, q.ready, q.desc, q.driver, q.device)
                               for q in self._queues),
                         self.interrupt.status)

    def restore_state(self, state: MmioState, device_state: object) -> None:
        """Take back saved registers and hand ``device_state`` to the device's ``restore_state``
        (the machine attached its backend first). Before :meth:`start`, with the VM not running.
        Every ready queue is then notified once, so chains the driver made available while the
        state was saved (or the device gave back) are served as soon as the I/O thread runs.
        Raises ValueError or QueueError for a state this transport cannot have had."""
        if len(state.queues) != len(self._queues):
            raise ValueError(f"{self.name}: {len(state.queues)} queues saved, the device has "
                             f"{len(self._queues)}")
        for name in ("status", "device_features_sel", "driver_features_sel", "queue_sel", "interrupt_status"):
            if not 0 <= getattr(state, name) <= 0xFFFF_FFFF:
                raise ValueError(f"{self.name}: {name} {getattr(state, name)} is not a 32-bit value")
        if not 0 <= state.driver_features < 1 << 64:
            raise ValueError(f"{self.name}: driver features {state.driver_features:#x} are not 64-bit")
        if state.interrupt_status & ~(INT_VRING | INT_CONFIG):
            raise ValueError(f"{self.name}: interrupt status {state.interrupt_status:#x} has unknown bits")
        for index, saved in enumerate(state.queues):
            if not 0 <= saved.num <= 0xFFFF_FFFF or not all(0 <= a < 1 << 64 for a in
                                                             (saved.desc, saved.driver, saved.device)):
                raise ValueError(f"{self.name}: queue {index} registers out of range")
        with self._lock:
            self._status = state.status & ~STATUS_DEVICE_NEEDS_RESET & 0xFF
            self._device_features_sel = state.device_features_sel
            self._driver_features_sel = state.driver_features_sel
            self._driver_features = state.driver_features
            self._queue_sel = state.queue_sel
            for regs, saved in zip(self._queues, state.queues, strict=True):
                regs.num, regs.ready = saved.num, saved.ready
                regs.desc, regs.driver, regs.device = saved.desc, saved.driver, saved.device
            with self.device.lock:
                self.device.restore_state(device_state, self.mem, self.interrupt)
                self._check_restored()
            self.interrupt.restore(state.interrupt_status)
        for q, fd in zip(self._queues, self._notify_fds, strict=False):  # no fds once closed
            if q.ready and self.device.active:
                os.eventfd_write(fd, 1)

    def _check_restored(self) -> None:  # both locks held
        """The device's restored queues must be the ones these registers describe."""
        device = self.device
        state = device.state
        active = state is not None
        if active != bool(self._status & STATUS_DRIVER_OK) and not device.needs_reset:
            raise ValueError(f"{self.name}: the device is {'active' if active else 'inactive'} but "
                             f"Status {self._status:#x} says otherwise")
        if state is None:
            return
        if state.features != self._driver_features:
            raise ValueError(f"{self.name}: the device runs with features {state.features:#x}, "
                             f"the driver accepted {self._driver_features:#x}")
        event_idx = bool(self._driver_features & bit(VIRTIO_RING_F_EVENT_IDX))
        indirect = bool(self._driver_features & bit(VIRTIO_RING_F_INDIRECT_DESC))
        for index, regs in enumerate(self._queues):
            queue = device.queue(index)
            # A queue the driver disabled after DRIVER_OK stays with the device (unused), and one
            # it enabled only after DRIVER_OK never reached it, so only queues both sides have
            # must match.
            if not regs.ready or queue is None:
                continue
            if ((queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr, queue.event_idx,
                 queue.indirect) != (regs.num, regs.desc, regs.driver, regs.device, event_idx, indirect)):
                raise ValueError(f"{self.name}: queue {index} of the device does not match the "
                                 "driver's queue registers")

    # -- the I/O thread --------------------------------------------------------------------------
    def _on_notify(self, fd: int, index: int) -> None:
        # Drain first: a notification arriving while the queue is served re-arms the eventfd.
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        self._serve_queue(index)

    def _serve_queue(self, index: int) -> None:
        device = self.device
        while True:
            with device.lock:
                if not device.active or device.needs_reset or index >= len(self._queues):
                    return
                if not self._queues[index].ready:
                    return  # the spec forbids touching a queue whose QueueReady is 0
                try:
                    more = device.process_queue(index)
                except QueueError as exc:
                    self._fail(f"queue {index}: {exc}")
                    return
                except Exception:  # a device-model bug must not kill the thread or the VMM
                    log.exception("%s: device failed while processing queue %d", self.name, index)
                    self._fail(f"internal error while processing queue {index}")
                    return
            if not more:
                return

    def _fail(self, reason: str) -> None:
        """DEVICE_NEEDS_RESET, and a config interrupt so the driver looks (device.lock held)."""
        self.device.fail(reason)
        self.interrupt.signal_config()

    # -- MMIO access -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            if size not in (1, 2, 4, 8):
                return 0
            return self.device.read_config(offset - CONFIG, size)
        if size not in (1, 2, 4):
            return 0
        # The driver must use aligned 32-bit accesses; narrower reads get the matching bytes of
        # the register, which is harmless because no register read has side effects.
        base = offset & ~3
        value = self._read_reg(base)
        shift = 8 * (offset - base)
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def _read_reg(self, reg: int) -> int:
        if reg == MAGIC:
            return MAGIC_VALUE
        if reg == VERSION:
            return MMIO_VERSION
        if reg == DEVICE_ID:
            return self.device.device_id
        if reg == VENDOR:
            return VENDOR_ID
        if reg == INTERRUPT_STATUS:
            return self.interrupt.status
        if reg == CONFIG_GENERATION:
            return self.device.config_generation
        if reg in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: length and base read as -1
        with self._lock:
            if reg == DEVICE_FEATURES:
                if self._device_features_sel > 1:
                    return 0
                return (self.device.device_features() >> (32 * self._device_features_sel)) & 0xFFFF_FFFF
            if reg == STATUS:
                return self._status | (STATUS_DEVICE_NEEDS_RESET if self.device.needs_reset else 0)
            q = self._selected_queue()
            if reg == QUEUE_NUM_MAX:
                return q.max_size if q is not None else 0
            if reg == QUEUE_READY:
                return int(q.ready) if q is not None else 0
        return 0  # write-only and reserved registers

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            if size in (1, 2, 4, 8):
                self.device.write_config(offset - CONFIG, size, value)
            return
        if size != 4 or offset & 3:
            if not self._bad_access_logged:
                self._bad_access_logged = True
                log.warning("%s: ignored a %d-byte write at register offset %#x (the driver must "
                            "use aligned 32-bit accesses)", self.name, size, offset)
            return
        value &= 0xFFFF_FFFF
        if offset == QUEUE_NOTIFY:
            # The same path as KVM's ioeventfd: wake the I/O thread, never do I/O on a vCPU.
            fds = self._notify_fds
            if value < len(fds) and not self._closed:
                try:
                    os.eventfd_write(fds[value], 1)
                except OSError:  # closed by a concurrent shutdown: nobody is listening any more
                    pass
            return
        if offset == INTERRUPT_ACK:
            self.interrupt.ack(value)
            return
        with self._lock:
            self._write_reg(offset, value)

    def _selected_queue(self) -> _QueueRegs | None:
        return self._queues[self._queue_sel] if self._queue_sel < len(self._queues) else None

    def _write_reg(self, reg: int, value: int) -> None:  # self._lock held
        if reg == DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif reg == DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif reg == DRIVER_FEATURES:
            if self._status & STATUS_FEATURES_OK or self._driver_features_sel > 1:
                return  # features are frozen once FEATURES_OK is set
            shift = 32 * self._driver_features_sel
            self._driver_features = (self._driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif reg == QUEUE_SEL:
            self._queue_sel = value
        elif reg == QUEUE_NUM:
            q = self._selected_queue()
            if q is not None and not q.ready:
                q.num = value
        elif reg == QUEUE_READY:
            self._write_queue_ready(value & 1)
        elif reg in _ADDR_REGS:
            q = self._selected_queue()
            if q is not None and not q.ready:
                field, shift = _ADDR_REGS[reg]
                old = getattr(q, field)
                setattr(q, field, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))
        elif reg == STATUS:
            self._write_status(value & 0xFF)
        # Read-only, unknown, SHM_SEL and QUEUE_RESET (VIRTIO_F_RING_RESET is not offered): ignored.

    def _write_queue_ready(self, ready: int) -> None:
        q = self._selected_queue()
        if q is None:
            return
        if ready:
            q.ready = True  # the queue is handed to the device at DRIVER_OK
            return
        # Disabling a queue: the I/O thread checks ``ready`` under device.lock, so once we hold
        # it the queue is no longer touched.
        with self.device.lock:
            q.ready = False

    def _features_acceptable(self) -> str | None:
        offered = self.device.device_features()
        extra = self._driver_features & ~offered
        if extra:
            return f"the driver accepted feature bits {extra:#x} that the device did not offer"
        if not self._driver_features & bit(VIRTIO_F_VERSION_1):
            return "the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
        return None

    def _write_status(self, value: int) -> None:  # self._lock held
        if value == 0:
            self._reset()
            return
        old = self._status
        new = value & ~STATUS_DEVICE_NEEDS_RESET  # a device-only bit
        if new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            problem = self._features_acceptable()
            if problem is not None:
                # Leaving FEATURES_OK clear is how the device refuses (spec §3.1.1 step 6).
                log.warning("%s: refusing FEATURES_OK: %s", self.name, problem)
                new &= ~STATUS_FEATURES_OK
        self._status = new
        if new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            self._activate()

    def _activate(self) -> None:  # self._lock held
        device = self.device
        if not self._status & STATUS_FEATURES_OK:
            with device.lock:
                self._fail("DRIVER_OK was set without FEATURES_OK")
            return
        features = self._driver_features
        event_idx = bool(features & bit(VIRTIO_RING_F_EVENT_IDX))
        indirect = bool(features & bit(VIRTIO_RING_F_INDIRECT_DESC))
        with device.lock:
            try:
                queues = [SplitQueue(self.mem, q.num, q.desc, q.driver, q.device,
                                     event_idx=event_idx, indirect=indirect) if q.ready else None
                          for q in self._queues]
            except QueueError as exc:
                self._fail(f"bad queue set-up: {exc}")
                return
            try:
                device.activate(self.mem, queues, self.interrupt, features)
            except QueueError as exc:
                device.release()
                self._fail(str(exc))
                return
        # Buffers the driver made available before DRIVER_OK (allowed for some devices) get
        # picked up now; for a driver that waited this finds nothing.
        for q, fd in zip(self._queues, self._notify_fds, strict=False):  # no fds once closed
            if q.ready:
                os.eventfd_write(fd, 1)

    def _reset(self) -> None:  # self._lock held
        with self.device.lock:
            self.device.reset()
            for q in self._queues:
                q.reset()
        self.interrupt.reset()
        self._status = 0
        self._driver_features = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
