"""decode_exit on kvm_run pages built by hand (no KVM needed): one test per exit kind."""

import ctypes

import pytest

from pystratovirt.kvm import exits as x
from pystratovirt.kvm import structs as s

PAGE_BYTES = 3 * 4096


def make_page():
    buf = bytearray(PAGE_BYTES)
    run = s.kvm_run.from_buffer(buf)
    return buf, run, memoryview(buf)


def test_io_out_reads_the_bytes_at_data_offset():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.IO
    run.io.direction = s.KVM_EXIT_IO_OUT
    run.io.size = 2
    run.io.port = 0x3F8
    run.io.count = 3
    run.io.data_offset = 4096
    buf[4096:4102] = b"abcdef"
    ex = x.decode_exit(run, page)
    assert isinstance(ex, x.IoOut)
    assert (ex.port, ex.size, ex.count, ex.length) == (0x3F8, 2, 3, 6)
    assert ex.data == b"abcdef"
    assert ex.elements() == [b"ab", b"cd", b"ef"]


def test_io_in_complete_writes_back_and_pads_with_ff():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.IO
    run.io.direction = s.KVM_EXIT_IO_IN
    run.io.size = 4
    run.io.port = 0x71
    run.io.count = 1
    run.io.data_offset = 4096
    ex = x.decode_exit(run, page)
    assert isinstance(ex, x.IoIn)
    ex.complete(b"\x12")
    assert buf[4096:4100] == b"\x12\xff\xff\xff"
    with pytest.raises(ValueError):
        ex.complete(b"12345")


def test_io_exit_pointing_outside_the_mapping_is_refused():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.IO
    run.io.size = 4
    run.io.count = 2
    run.io.data_offset = PAGE_BYTES - 4
    with pytest.raises(ValueError):
        x.decode_exit(run, page)


def test_mmio_write_and_read_completion():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.MMIO
    run.mmio.phys_addr = 0xF010_0000
    run.mmio.len = 4
    run.mmio.is_write = 1
    run.mmio.data[:4] = [1, 2, 3, 4]
    ex = x.decode_exit(run, page)
    assert isinstance(ex, x.MmioWrite)
    assert (ex.addr, ex.len, ex.data) == (0xF010_0000, 4, b"\x01\x02\x03\x04")

    run.mmio.is_write = 0
    run.mmio.len = 2
    ex = x.decode_exit(run, page)
    assert isinstance(ex, x.MmioRead) and (ex.addr, ex.len) == (0xF010_0000, 2)
    ex.complete(b"\xaa\xbb")
    assert bytes(run.mmio.data[:2]) == b"\xaa\xbb"


def test_simple_exits():
    buf, run, page = make_page()
    for reason, cls in ((x.ExitReason.HLT, x.Hlt), (x.ExitReason.SHUTDOWN, x.Shutdown),
                        (x.ExitReason.INTR, x.Interrupted)):
        run.exit_reason = reason
        assert isinstance(x.decode_exit(run, page), cls)


def test_system_event():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.SYSTEM_EVENT
    run.system_event.type = 2
    run.system_event.ndata = 1
    run.system_event.flags = 7
    ex = x.decode_exit(run, page)
    assert ex == x.SystemEvent(x.SystemEventType.RESET, 7, (7,))


def test_internal_error_with_instruction_bytes():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.INTERNAL_ERROR
    ef = run.emulation_failure
    ef.suberror = 1
    ef.ndata = 5
    ef.flags = s.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    ef.insn_size = 2
    ef.insn_bytes[:2] = [0x0F, 0x01]
    ex = x.decode_exit(run, page)
    assert isinstance(ex, x.InternalError) and ex.is_emulation_failure
    assert ex.insn_bytes == b"\x0f\x01"
    assert ex.ndata == 5 and len(ex.data) == 5
    assert "0f 01" in ex.describe()


def test_internal_error_without_instruction_bytes():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.INTERNAL_ERROR
    run.internal.suberror = 3
    run.internal.ndata = 2
    run.internal.data[0] = 0x80000021
    ex = x.decode_exit(run, page)
    assert ex.suberror == x.InternalSuberror.DELIVERY_EV
    assert ex.insn_bytes is None and not ex.is_emulation_failure
    assert ex.data == (0x80000021, 0)


def test_emulation_failure_without_the_flag_has_no_bytes():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.INTERNAL_ERROR
    run.emulation_failure.suberror = 1
    run.emulation_failure.ndata = 0  # an old kernel: nothing valid
    run.emulation_failure.flags = 1
    assert x.decode_exit(run, page).insn_bytes is None


def test_fail_entry_debug_and_unknown():
    buf, run, page = make_page()
    run.exit_reason = x.ExitReason.FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason = 0x21
    run.fail_entry.cpu = 3
    assert x.decode_exit(run, page) == x.FailEntry(0x21, 3)

    run.exit_reason = x.ExitReason.DEBUG
    run.debug.arch.exception = 1
    run.debug.arch.pc = 0x1234
    assert x.decode_exit(run, page) == x.Debug(1, 0x1234, 0, 0)

    run.exit_reason = x.ExitReason.UNKNOWN
    run.hw.hardware_exit_reason = 0x30
    assert x.decode_exit(run, page) == x.Unknown(x.ExitReason.UNKNOWN, 0x30)

    run.exit_reason = x.ExitReason.IRQ_WINDOW_OPEN
    assert x.decode_exit(run, page) == x.Unknown(x.ExitReason.IRQ_WINDOW_OPEN, 0)

    run.exit_reason = 999
    assert x.decode_exit(run, page) == x.Unknown(999, 0)


def test_the_run_struct_is_as_big_as_the_kernels():
    assert ctypes.sizeof(s.kvm_run) == 2352
