"""Interrupt lines as device models see them: a level that the machine turns into a KVM GSI."""

from __future__ import annotations

import threading
from collections.abc import Callable


class IrqLine:
    """A level-triggered interrupt line; only level changes reach KVM.

    ``setter(level)`` is called with the lock held, so two threads raising and lowering the same
    line cannot reorder their updates on the way to the irqchip.
    """

    def __init__(self, gsi: int, setter: Callable[[int], None]):
        self.gsi = gsi
        self._setter = setter
        self._level = 0
        self._lock = threading.Lock()

    @property
    def level(self) -> int:
        return self._level

    def set_level(self, level: bool | int) -> None:
        level = 1 if level else 0
        with self._lock:
            if level != self._level:
                self._level = level
                self._setter(level)
