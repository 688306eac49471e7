"""The bits of the PC keyboard controller and system control port a micro-VM needs.

* i8042 (ports 0x60, 0x64): no keyboard, but command 0xFE on port 0x64 pulses the CPU reset
  line, which is how Linux's ``reboot=k`` restarts the machine. We turn it into a guest reset.
* System control port B (0x61): reads 0x20 (the PIT channel 2 output toggling), which old
  kernels' ``pit_calibrate_tsc()`` polls for.

Neither holds any state (every read answers a constant), so a snapshot has nothing to save here.
"""

from __future__ import annotations

from collections.abc import Callable

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_RESET_COMMAND = 0xFE
PORT_B = 0x61


class I8042:
    """Covers ports 0x60..0x64 (so 0x61 is answered here too)."""

    BASE = 0x60
    LENGTH = 5

    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        port = self.BASE + offset
        if port == PORT_B:
            return 0x20
        # Status register: output buffer empty, input buffer empty; data port: nothing to read.
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.BASE + offset == I8042_COMMAND_PORT and value & 0xFF == I8042_RESET_COMMAND:
            self._on_reset()
