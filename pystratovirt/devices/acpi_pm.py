"""The hardware-reduced ACPI sleep registers: how an ACPI guest powers the VM off.

The FADT (boot.acpi) points SLEEP_CONTROL_REG and SLEEP_STATUS_REG at two one-byte I/O ports,
layout.ACPI_SLEEP_CONTROL_PORT and the port after it; this device covers both (ACPI 6.x
sections 4.8.3.7 and 4.8.3.8):

* SLEEP_CONTROL_REG: SLP_TYPx in bits 4:2, SLP_EN in bit 5 (write-only; reads as 0). Writing
  SLP_EN with the ``\\_S5_`` value calls ``on_poweroff()``.
* SLEEP_STATUS_REG: WAK_STS in bit 7, write 1 to clear.

Only S5 exists (the DSDT offers no other ``\\_Sx``). A request for any other state is logged and
answered with an immediate wake: WAK_STS is set at once, so an OSPM that polls for it (Linux's
acpi_hw_extended_sleep does) carries on instead of spinning forever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..memory.layout import ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT

log = logging.getLogger(__name__)

SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7
SLP_EN = 1 << 5
WAK_STS = 1 << 7
SLP_TYP_S5 = 5                   # must match boot.acpi.SLP_TYP_S5 (the \_S5_ package)

CONTROL_OFFSET = 0
STATUS_OFFSET = ACPI_SLEEP_STATUS_PORT - ACPI_SLEEP_CONTROL_PORT


@dataclass(frozen=True)
class AcpiPmState:
    """The sleep registers as a value (for snapshots): only WAK_STS holds anything."""

    wak_sts: bool


class AcpiPm:
    """Ports BASE (SLEEP_CONTROL_REG) and BASE + 1 (SLEEP_STATUS_REG)."""

    BASE = ACPI_SLEEP_CONTROL_PORT
    LENGTH = 2

    def __init__(self, on_poweroff: Callable[[], None]):
        self._on_poweroff = on_poweroff
        self._lock = threading.Lock()
        self._wak_sts = False

    def save_state(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(self._wak_sts)

    def restore_state(self, state: AcpiPmState) -> None:
        with self._lock:
            self._wak_sts = state.wak_sts

    # Wider accesses are split into their bytes (little-endian), one register per byte.
    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        if offset == STATUS_OFFSET:
            with self._lock:
                return WAK_STS if self._wak_sts else 0
        return 0

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == STATUS_OFFSET:
            if value & WAK_STS:
                with self._lock:
                    self._wak_sts = False
            return
        if offset != CONTROL_OFFSET or not value & SLP_EN:
            return
        slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
        if slp_typ == SLP_TYP_S5:
            log.info("guest entered ACPI S5 (soft off)")
            self._on_poweroff()
            return
        log.warning("guest asked for ACPI sleep type %d, which this VM does not offer; waking it "
                    "at once", slp_typ)
        with self._lock:
            self._wak_sts = True
