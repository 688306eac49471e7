"""A 16550A UART (the guest's ttyS0 at port 0x3f8, IRQ 4) with real RX and THRE interrupts.

Registers follow the National Semiconductor PC16550D data sheet. The guest sees an always-ready
transmitter: bytes written to THR go straight to the host sink, so THR is empty again at once
and, when the guest enabled it, the THR-empty interrupt fires. Received bytes wait in a bounded
FIFO; while it is full the host side stops reading its input (``can_receive``) instead of
dropping bytes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .irq import IrqLine

SERIAL_PORT_BASE = 0x3F8
SERIAL_PORT_LEN = 8
SERIAL_IRQ = 4

# Register offsets.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01   # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_RLS = 0x04   # receiver line status
IER_MASK = 0x0F

IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO = 0xC0

LCR_DLAB = 0x80
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCD_DSR_CTS = 0xB0  # carrier, data set ready, clear to send: a connected modem line

RX_FIFO_LIMIT = 64 * 1024  # bytes held for the guest before the host stops reading input


@dataclass(frozen=True)
class SerialState:
    """The UART as a value (for snapshots): every register the guest can read back, whether a
    THR-empty interrupt is pending, and the received bytes the guest has not read yet."""

    ier: int
    lcr: int
    mcr: int
    scr: int
    dll: int
    dlm: int
    fcr: int
    thre_pending: bool
    rx: bytes


class Serial:
    """Device model; ``sink(bytes)`` receives the guest's output, ``feed(bytes)`` provides input."""

    def __init__(self, irq: IrqLine, sink: Callable[[bytes], None]):
        self._irq = irq
        self._sink = sink
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = 0x08  # OUT2, which PCs use to gate the IRQ line
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.fcr = 0
        self._thre_pending = False

    # -- host side ------------------------------------------------------------------------------
    def can_receive(self) -> int:
        with self._lock:
            return max(0, RX_FIFO_LIMIT - len(self._rx))

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were taken."""
        with self._lock:
            room = max(0, RX_FIFO_LIMIT - len(self._rx))
            taken = data[:room]
            self._rx.extend(taken)
            self._update_irq()
        return len(taken)

    # -- state as a value -------------------------------------------------------------------------
    def save_state(self) -> SerialState:
        with self._lock:
            return SerialState(self.ier, self.lcr, self.mcr, self.scr, self.dll, self.dlm, self.fcr,
                               self._thre_pending, bytes(self._rx))

    def restore_state(self, state: SerialState) -> None:
        """Take back a saved state and drive the IRQ line to match it (ValueError for a value no
        register can hold)."""
        for name in ("ier", "lcr", "mcr", "scr", "dll", "dlm", "fcr"):
            if not 0 <= getattr(state, name) <= 0xFF:
                raise ValueError(f"serial register {name} = {getattr(state, name)} is not a byte")
        if len(state.rx) > RX_FIFO_LIMIT:
            raise ValueError(f"serial receive FIFO of {len(state.rx)} bytes, more than {RX_FIFO_LIMIT}")
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr = state.ier & IER_MASK, state.lcr, state.mcr & MCR_MASK, state.scr
            self.dll, self.dlm, self.fcr = state.dll, state.dlm, state.fcr
            self._thre_pending = state.thre_pending
            self._rx = deque(state.rx)
            self._update_irq()

    # -- guest side -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._read(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        out = None
        with self._lock:
            out = self._write(offset, value & 0xFF)
        if out is not None:
            self._sink(out)

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            value = self._rx.popleft() if self._rx else 0
            self._update_irq()
            return value
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRE:
                # Reading IIR while it reports THRE acknowledges that interrupt.
                self._thre_pending = False
                self._update_irq()
            return iir | (IIR_FIFO if self.fcr & 0x01 else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT
            if self._rx:
                lsr |= LSR_DR
            return lsr
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # Loopback wiring: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                m = self.mcr
                return ((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            return MSR_DCD_DSR_CTS
        return self.scr  # SCR

    def _write(self, offset: int, value: int) -> bytes | None:
        dlab = self.lcr & LCR_DLAB
        out = None
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                if len(self._rx) < RX_FIFO_LIMIT:
                    self._rx.append(value)
                self._thre_pending = True
            else:
                out = bytes((value,))
                self._thre_pending = True
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                enabling_thre = (value & IER_THRE) and not (self.ier & IER_THRE)
                self.ier = value & IER_MASK
                if enabling_thre:
                    # THR is always empty here, so enabling ETBEI raises the interrupt at once.
                    self._thre_pending = True
        elif offset == IIR_FCR:
            self.fcr = value & 0xC9
            if value & 0x02:
                self._rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & MCR_MASK
        elif offset == SCR:
            self.scr = value
        self._update_irq()
        return out

    def _iir(self) -> int:
        if self.ier & IER_RDA and self._rx:
            return IIR_RDA
        if self.ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _update_irq(self) -> None:
        self._irq.set_level(self._iir() != IIR_NONE)
