"""The micro-VM's virtio-mmio devices: fixed windows and IRQs, KVM wiring, discovery, lifetime.

Layout (StratoVirt's): window ``i`` is at 0xF0100000 + i * 0x200 with IRQ 5 + i. Windows 0..5
are the block slots, 6..7 the net slots, 8 the balloon, whether or not a slot is filled, so a
guest always finds a device at the same address. The guest learns about them two ways: one
``virtio_mmio.device=512@0x...:IRQ`` kernel parameter per window (StratoVirt's way, for kernels
built with VIRTIO_MMIO_CMDLINE_DEVICES) and one ACPI device (``LNRO0005``) per window in the DSDT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..devices.bus import Bus
from ..memory import GuestMemory
from ..memory.layout import VIRTIO_MMIO_SIZE
from ..virtio.device import VirtioDevice
from ..virtio.mmio import VirtioMmio, cmdline_entry, slot_resources

log = logging.getLogger(__name__)

BLOCK_WINDOW_FIRST = 0
NET_WINDOW_FIRST = 6
BALLOON_WINDOW = 8


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
    def __init__(self, vm, memory: GuestMemory, bus: Bus):
        self._vm = vm
        self._memory = memory
        self._bus = bus
        self.windows: list[MmioWindow] = []

    def add(self, index: int, device: VirtioDevice) -> MmioWindow:
        base, irq = slot_resources(index)
        transport = VirtioMmio(device, self._memory, name=device.name)
        self._bus.insert(base, VIRTIO_MMIO_SIZE, transport)
        transport.kvm_attach(self._vm, base, irq)
        window = MmioWindow(index, base, irq, transport)
        self.windows.append(window)
        self.windows.sort(key=lambda w: w.index)
        return window

    def cmdline(self) -> str:
        return " ".join(cmdline_entry(w.base, w.irq) for w in self.windows)

    def acpi_resources(self) -> list[tuple[int, int, int]]:
        """(base, size, irq) of every window, for the DSDT."""
        return [(w.base, VIRTIO_MMIO_SIZE, w.irq) for w in self.windows]

    def start(self) -> None:
        for w in self.windows:
            w.transport.start()

    def close(self) -> None:
        """Stop the I/O threads and close the devices (block devices flush to disk)."""
        for w in self.windows:
            try:
                w.transport.close(timeout=5.0)
            except Exception:  # one stuck device must not keep the others from flushing
                log.exception("closing %s failed", w.transport.name)
