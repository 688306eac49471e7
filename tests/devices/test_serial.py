"""16550A model: register semantics and interrupt levels, as Linux's 8250 driver relies on them."""

from pystratovirt.devices.irq import IrqLine
from pystratovirt.devices.serial import (
    IER_DLM,
    IER_RDA,
    IER_THRE,
    IIR_FCR,
    LCR,
    LSR,
    MCR,
    MSR,
    RBR_THR_DLL,
    RX_FIFO_LIMIT,
    SCR,
    Serial,
)


def make():
    levels = []
    out = []
    line = IrqLine(4, levels.append)
    return Serial(line, out.append), line, levels, out


def test_output_goes_to_sink_and_thr_is_always_empty():
    s, line, _, out = make()
    for ch in b"hi\n":
        assert s.read(LSR, 1) & 0x60 == 0x60
        s.write(RBR_THR_DLL, 1, ch)
    assert b"".join(out) == b"hi\n"
    assert line.level == 0  # no interrupt without IER


def test_thre_interrupt_raised_on_enable_and_acked_by_iir_read():
    s, line, levels, _ = make()
    s.write(IER_DLM, 1, IER_THRE)
    assert line.level == 1
    assert s.read(IIR_FCR, 1) & 0x0F == 0x02
    assert line.level == 0
    assert s.read(IIR_FCR, 1) & 0x0F == 0x01
    s.write(RBR_THR_DLL, 1, ord("x"))
    assert line.level == 1
    assert levels == [1, 0, 1]


def test_rx_interrupt_and_data_ready():
    s, line, _, _ = make()
    s.write(IER_DLM, 1, IER_RDA)
    assert line.level == 0
    assert s.feed(b"ab") == 2
    assert line.level == 1
    assert s.read(LSR, 1) & 0x01
    assert s.read(IIR_FCR, 1) & 0x0F == 0x04
    assert s.read(RBR_THR_DLL, 1) == ord("a")
    assert line.level == 1
    assert s.read(RBR_THR_DLL, 1) == ord("b")
    assert line.level == 0
    assert not s.read(LSR, 1) & 0x01


def test_rx_priority_over_thre():
    s, _, _, _ = make()
    s.write(IER_DLM, 1, IER_RDA | IER_THRE)
    s.feed(b"z")
    assert s.read(IIR_FCR, 1) & 0x0F == 0x04


def test_divisor_latch_and_scratch():
    s, _, _, out = make()
    s.write(LCR, 1, 0x83)
    s.write(RBR_THR_DLL, 1, 0x01)
    s.write(IER_DLM, 1, 0x00)
    assert s.read(RBR_THR_DLL, 1) == 0x01
    s.write(LCR, 1, 0x03)
    assert out == []  # divisor writes are not output
    s.write(SCR, 1, 0x5A)
    assert s.read(SCR, 1) == 0x5A


def test_loopback_as_linux_autoconfig_probes_it():
    s, _, _, out = make()
    s.write(MCR, 1, 0x10 | 0x0A)  # loop + RTS + OUT2
    assert s.read(MSR, 1) & 0xF0 == 0x90  # CTS + DCD
    s.write(RBR_THR_DLL, 1, 0x55)
    assert out == []
    assert s.read(RBR_THR_DLL, 1) == 0x55


def test_fifo_is_bounded_not_lossy():
    s, _, _, _ = make()
    assert s.feed(b"x" * (RX_FIFO_LIMIT + 10)) == RX_FIFO_LIMIT
    assert s.can_receive() == 0
    s.read(RBR_THR_DLL, 1)
    assert s.can_receive() == 1


def test_state_round_trip_keeps_registers_pending_input_and_the_irq_level():
    s, _, _, _ = make()
    s.write(LCR, 1, 0x83)           # DLAB on: program the divisor
    s.write(RBR_THR_DLL, 1, 0x01)
    s.write(IER_DLM, 1, 0x00)
    s.write(LCR, 1, 0x03)
    s.write(MCR, 1, 0x0B)
    s.write(SCR, 1, 0x5A)
    s.write(IER_DLM, 1, IER_RDA)
    s.feed(b"xyz")
    assert s.read(RBR_THR_DLL, 1) == ord("x")
    state = s.save_state()
    assert state.rx == b"yz" and state.dll == 0x01 and state.scr == 0x5A

    copy, line, levels, _ = make()
    copy.restore_state(state)
    assert line.level == 1 and levels == [1]  # the pending input raises the line again
    assert copy.save_state() == state
    assert [copy.read(RBR_THR_DLL, 1) for _ in range(2)] == [ord("y"), ord("z")]
    assert line.level == 0


def test_state_with_impossible_values_is_refused():
    import dataclasses

    import pytest
    s, _, _, _ = make()
    state = s.save_state()
    with pytest.raises(ValueError, match="not a byte"):
        s.restore_state(dataclasses.replace(state, lcr=256))
    with pytest.raises(ValueError, match="receive FIFO"):
        s.restore_state(dataclasses.replace(state, rx=bytes(RX_FIFO_LIMIT + 1)))
