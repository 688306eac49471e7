"""The micro-VM's virtio-mmio devices: fixed windows and IRQs, KVM wiring, discovery, I/O threads,
lifetime.

Layout (StratoVirt's): window ``i`` is at 0xF0100000 + i * 0x200 with IRQ 5 + i. The block slots
come first, then the net slots (:func:`window_index`; the slot counts are :mod:`.slots`'), whether
or not a slot is filled, so a guest always finds a disk or NIC at the same address. The devices
a configuration may or may not have follow in the windows after them (:meth:`MmioDevices.add_next`):
the balloon first (so it is always at :data:`BALLOON_WINDOW` when there is one), then the rng,
then the consoles. IRQs 5-15 make :data:`WINDOW_COUNT` windows, so :data:`EXTRA_WINDOWS` of those
devices fit (StratoVirt's limit too: ``IRQ number exhausted``). The guest learns about them two
ways: one ``virtio_mmio.device=512@0x...:IRQ`` kernel parameter per window (StratoVirt's way, for
kernels built with VIRTIO_MMIO_CMDLINE_DEVICES) and one ACPI device (``LNRO0005``) per window in
the DSDT.

Each device runs on an I/O thread: its own, or a named ``iothread`` (``-iothread id=N`` and a
device's ``iothread=N``) that several devices share.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..devices.bus import Bus
from ..memory import GuestMemory
from ..memory.layout import VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST, VIRTIO_MMIO_SIZE
from ..util.eventloop import EventLoop
from ..virtio.device import VirtioDevice
from ..virtio.mmio import IO_POLL, VirtioMmio, cmdline_entry, slot_resources
from .slots import BLOCK_SLOTS, NET_SLOTS, SlotKind

if TYPE_CHECKING:
    from ..kvm.vm import Vm

log = logging.getLogger(__name__)

FIRST_EXTRA_WINDOW = BLOCK_SLOTS + NET_SLOTS
BALLOON_WINDOW = FIRST_EXTRA_WINDOW
WINDOW_COUNT = VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1
EXTRA_WINDOWS = WINDOW_COUNT - FIRST_EXTRA_WINDOW


def window_index(kind: SlotKind, slot: int) -> int:
    """The virtio-mmio window of replaceable slot ``slot`` of ``kind``."""
    return slot if kind is SlotKind.BLOCK else BLOCK_SLOTS + slot


@dataclass
class MmioWindow:
    index: int
    base: int
    irq: int
    transport: VirtioMmio

    @property
    def device(self) -> VirtioDevice:
        return self.transport.device


class MmioDevices:
    """The windows, and the I/O threads their devices run on (``on_thread_start`` runs first on
    each I/O thread: the machine installs the thread's seccomp filter there)."""

    def __init__(self, vm: Vm, memory: GuestMemory, bus: Bus, iothreads: Sequence[str] = (),
                 on_thread_start: Callable[[], None] | None = None):
        self._vm = vm
        self._memory = memory
        self._bus = bus
        self._on_thread_start = on_thread_start
        self.iothreads = {name: EventLoop(name, poll_after=IO_POLL) for name in iothreads}
        self.windows: list[MmioWindow] = []

    def add(self, index: int, device: VirtioDevice, iothread: str | None = None) -> MmioWindow:
        base, irq = slot_resources(index)
        io = self.iothreads[iothread] if iothread is not None else None
        transport = VirtioMmio(device, self._memory, name=device.name, io=io)
        self._bus.insert(base, VIRTIO_MMIO_SIZE, transport)
        transport.kvm_attach(self._vm, base, irq)
        window = MmioWindow(index, base, irq, transport)
        self.windows.append(window)
        self.windows.sort(key=lambda w: w.index)
        return window

    def add_next(self, device: VirtioDevice, iothread: str | None = None) -> MmioWindow:
        """Put ``device`` in the first free window after the replaceable slots."""
        used = {w.index for w in self.windows}
        for index in range(FIRST_EXTRA_WINDOW, WINDOW_COUNT):
            if index not in used:
                return self.add(index, device, iothread)
        raise ValueError(f"no virtio-mmio window is left for {device.name}")

    def cmdline(self) -> str:
        return " ".join(cmdline_entry(w.base, w.irq) for w in self.windows)

    def acpi_resources(self) -> list[tuple[int, int, int]]:
        """(base, size, irq) of every window, for the DSDT."""
        return [(w.base, VIRTIO_MMIO_SIZE, w.irq) for w in self.windows]

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold every device still: each device's lock, which its I/O thread holds whenever it
        touches the device's queues, guest memory or backend (queue service, tap events, the
        balloon's statistics request, backend swaps). With the vCPUs paused as well, nothing
        changes guest memory or device state until the block ends; the snapshot is taken in it.
        The I/O threads wait on the locks meanwhile (each takes one device lock at a time, so
        taking them all here cannot deadlock)."""
        with contextlib.ExitStack() as stack:
            for w in self.windows:
                stack.enter_context(w.device.lock)
            yield

    def start(self) -> None:
        for loop in self.iothreads.values():
            loop.start(self._on_thread_start)
        for w in self.windows:
            w.transport.start(self._on_thread_start)

    def close(self) -> None:
        """Stop the I/O threads, then close the devices (block devices flush to disk)."""
        for loop in self.iothreads.values():
            loop.stop(5.0)
        for w in self.windows:
            try:
                w.transport.close(timeout=5.0)
            except Exception:  # one stuck device must not keep the others from flushing
                log.exception("closing %s failed", w.transport.name)
        for loop in self.iothreads.values():
            loop.close()
