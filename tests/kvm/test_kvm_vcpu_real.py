"""The kvm layer on the real /dev/kvm: a real-mode guest doing port IO, MMIO, ioeventfd, kicks,
and round trips of vCPU state. Guest code is hand-assembled 16-bit x86 (see the comments)."""

import errno
import os
import signal
import threading
import time

import pytest

from kvm.kvm_guest_helpers import CODE
from pystratovirt.kvm import (
    Cap,
    Hlt,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    MsrAccessError,
    install_kick_signal,
)
from pystratovirt.kvm import structs as s

pytestmark = pytest.mark.kvm


def test_real_mode_out_in_hlt(guest_factory):
    g = guest_factory(
        "b042"      # mov al, 0x42
        "baf803"    # mov dx, 0x3f8
        "ee"        # out dx, al
        "e471"      # in al, 0x71
        "ee"        # out dx, al
        "f4")       # hlt
    ex = g.vcpu.run()
    assert isinstance(ex, IoOut)
    assert (ex.port, ex.size, ex.count, ex.data) == (0x3F8, 1, 1, b"\x42")
    ex = g.vcpu.run()
    assert isinstance(ex, IoIn) and (ex.port, ex.size) == (0x71, 1)
    ex.complete(b"\x55")
    ex = g.vcpu.run()
    assert isinstance(ex, IoOut) and ex.data == b"\x55"
    assert isinstance(g.vcpu.run(), Hlt)
    regs = g.vcpu.get_regs()
    assert regs.rip == CODE + 10  # just past the hlt
    assert regs.rax & 0xFF == 0x55


def test_rep_outsb_delivers_every_byte(guest_factory):
    g = guest_factory(
        "be0020"    # mov si, 0x2000
        "b90500"    # mov cx, 5
        "baf803"    # mov dx, 0x3f8
        "f36e"      # rep outsb
        "f4")       # hlt
    g.ram[0x2000:0x2005] = b"hello"
    out = b""
    for _ in range(10):
        ex = g.vcpu.run()
        if isinstance(ex, Hlt):
            break
        assert isinstance(ex, IoOut) and ex.port == 0x3F8 and ex.size == 1
        out += ex.data
    assert out == b"hello"


def test_mmio_write_and_read_outside_ram(guest_factory):
    g = guest_factory(
        "b80010"      # mov ax, 0x1000
        "8ed8"        # mov ds, ax        ; DS base 0x10000: just past the RAM slot
        "c606002077"  # mov byte [0x2000], 0x77
        "a00020"      # mov al, [0x2000]
        "baf803"      # mov dx, 0x3f8
        "ee"          # out dx, al
        "f4")         # hlt
    ex = g.vcpu.run()
    assert isinstance(ex, MmioWrite)
    assert (ex.addr, ex.len, ex.data) == (0x12000, 1, b"\x77")
    ex = g.vcpu.run()
    assert isinstance(ex, MmioRead) and (ex.addr, ex.len) == (0x12000, 1)
    ex.complete(b"\x99")
    ex = g.vcpu.run()
    assert isinstance(ex, IoOut) and ex.data == b"\x99"


def test_ioeventfd_pio_signals_without_an_exit(kvm, guest_factory):
    if not kvm.check_extension(Cap.IOEVENTFD):
        pytest.skip("no KVM_CAP_IOEVENTFD")
    g = guest_factory(
        "ba0005"    # mov dx, 0x500
        "b001"      # mov al, 1
        "ee"        # out dx, al        ; swallowed by the ioeventfd
        "b002"      # mov al, 2
        "ee"        # out dx, al        ; datamatch 1 only: this one exits
        "f4")       # hlt
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        g.vm.ioeventfd(efd, 0x500, 1, datamatch=1, pio=True)
        ex = g.vcpu.run()
        assert isinstance(ex, IoOut) and ex.port == 0x500 and ex.data == b"\x02"
        assert os.eventfd_read(efd) == 1
        g.vm.ioeventfd(efd, 0x500, 1, datamatch=1, pio=True, deassign=True)
        with pytest.raises(OSError):  # a second deassign finds nothing
            g.vm.ioeventfd(efd, 0x500, 1, datamatch=1, pio=True, deassign=True)
    finally:
        os.close(efd)
    with pytest.raises(ValueError):
        g.vm.ioeventfd(0, 0x500, 3)


def test_irqchip_pit_irqfd_and_irq_line(guest_factory):
    g = guest_factory("f4", irqchip=True)
    g.vm.create_pit2(speaker_dummy=True)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        g.vm.irqfd(efd, 5)
        g.vm.irqfd(efd, 5, deassign=True)
    finally:
        os.close(efd)
    g.vm.irq_line(4, 1)
    g.vm.irq_line(4, 0)


def test_immediate_exit_returns_before_running(guest_factory):
    g = guest_factory("b042" "baf803" "ee" "f4")
    g.vcpu.immediate_exit = True
    assert isinstance(g.vcpu.run(), Interrupted)
    assert g.vcpu.get_regs().rip == CODE  # nothing ran
    assert g.vcpu.immediate_exit
    g.vcpu.ack_kick()
    assert not g.vcpu.immediate_exit
    assert isinstance(g.vcpu.run(), IoOut)


def test_kick_outside_run_is_remembered(guest_factory):
    g = guest_factory("ebfe")  # jmp $
    g.vcpu.kick()  # nobody is in KVM_RUN: only immediate_exit is set, no signal is sent
    assert isinstance(g.vcpu.run(), Interrupted)


def test_kick_pulls_a_spinning_vcpu_out_of_kvm_run(guest_factory):
    g = guest_factory("ebfe")  # jmp $: never exits by itself
    previous = signal.getsignal(signal.SIGUSR1)
    install_kick_signal()
    try:
        result = {}

        def vcpu_thread():
            result["native_id"] = threading.get_native_id()
            result["exit"] = g.vcpu.run()

        t = threading.Thread(target=vcpu_thread)
        t.start()
        deadline = time.monotonic() + 5
        while not g.vcpu._in_run and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # let it get into the guest
        assert t.is_alive()
        g.vcpu.kick()
        t.join(5)
        assert not t.is_alive(), "kick did not interrupt KVM_RUN"
        assert isinstance(result["exit"], Interrupted)
        assert g.vcpu.thread_id == result["native_id"]
        assert g.vcpu.get_regs().rip == CODE  # still spinning on the jmp
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_install_kick_signal_refuses_other_threads():
    errors = []

    def other():
        try:
            install_kick_signal()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors


def test_state_round_trips(kvm, guest_factory):
    g = guest_factory("f4", irqchip=True)
    v = g.vcpu
    regs = v.get_regs()
    regs.rbx = 0x1122_3344_5566_7788
    v.set_regs(regs)
    assert v.get_regs().rbx == 0x1122_3344_5566_7788

    sregs = v.get_sregs()
    sregs.ds.base = 0x5000
    sregs.ds.selector = 0x500
    v.set_sregs(sregs)
    assert (v.get_sregs().ds.base, v.get_sregs().ds.selector) == (0x5000, 0x500)

    fpu = v.get_fpu()
    fpu.fcw = 0x27F
    fpu.xmm[3][0] = 0x5A
    v.set_fpu(fpu)
    assert (v.get_fpu().fcw, v.get_fpu().xmm[3][0]) == (0x27F, 0x5A)
    # KVM_GET/SET_FPU do not carry MXCSR at all (upstream KVM copies every fxsave field but
    # that one): on this host it reads back as 0 whatever was set.
    fpu.mxcsr = 0x1F80
    v.set_fpu(fpu)
    assert v.get_fpu().mxcsr in (0, 0x1F80)

    v.set_msrs([(0x174, 0x10), (0xC000_0082, 0xFFFF_FFFF_8100_0000)])
    assert v.get_msrs([0x174, 0xC000_0082]) == [(0x174, 0x10), (0xC000_0082, 0xFFFF_FFFF_8100_0000)]
    with pytest.raises(MsrAccessError):
        v.get_msrs([0x174, 0x4000_FFFF])  # not an MSR KVM knows

    lapic = v.get_lapic()
    lapic.set_reg(0x360, 0x400)
    v.set_lapic(lapic)
    assert v.get_lapic().get_reg(0x360) == 0x400

    events = v.get_vcpu_events()
    v.set_vcpu_events(events)
    assert v.get_mp_state() == s.KVM_MP_STATE_RUNNABLE  # vCPU 0 is the BSP

    entries = kvm.get_supported_cpuid()[:8]
    v.set_cpuid2(entries)
    back = v.get_cpuid2()
    # KVM may add or adjust leaves of its own (a ring-0-emulating host adds leaf 0xD and ORs in
    # features the hardware cannot hide from guest user mode); what was set must still be there.
    assert {(e.function, e.index) for e in entries} <= {(e.function, e.index) for e in back}
    assert back[0] == entries[0]

    tr = v.translate(0x1234)  # paging is off in real mode: identity
    assert tr.valid and tr.physical_address == 0x1234


def test_vcpu_close_releases_the_mapping(kvm):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    fd = vcpu.fd
    vcpu.close()
    vcpu.close()  # idempotent
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    vm.close()
