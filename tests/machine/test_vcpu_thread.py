"""The vCPU thread's exit loop without KVM: a scripted vCPU hands it exits, a fake machine records
what the buses saw. Checks the dispatch of the fast IN/OUT paths and the exit accounting that
bench/boot_time.py reads from the log."""

from __future__ import annotations

import logging
from time import perf_counter_ns

from pystratovirt.kvm import exits
from pystratovirt.machine.vcpu_thread import PauseGate, VcpuThread


class ScriptedVcpu:
    """Returns the given exits one per run(), as KVM_RUN would."""

    def __init__(self, script):
        self.index = 0
        self.script = list(script)
        self.left_guest_ns = 0
        self.kicks_acked = 0

    def run(self):
        exit_ = self.script.pop(0)
        self.left_guest_ns = perf_counter_ns()
        return exit_

    def ack_kick(self):
        self.kicks_acked += 1


class Bus:
    def __init__(self, value=0):
        self.writes, self.reads, self.value = [], [], value

    def write(self, addr, size, value):
        self.writes.append((addr, size, value))

    def read(self, addr, size):
        self.reads.append((addr, size))
        return self.value


class Host:
    def __init__(self):
        self.pio_bus, self.mmio_bus = Bus(value=0x41), Bus(value=0x1234)
        self.shutdowns, self.errors = [], []

    def memory(self):
        return None

    def guest_shutdown(self, reset):
        self.shutdowns.append(reset)

    def fatal_error(self, message):
        self.errors.append(message)


def run_script(script, caplog):
    vcpu, host = ScriptedVcpu(script), Host()
    thread = VcpuThread(host, vcpu, PauseGate(1))
    with caplog.at_level(logging.INFO, logger="pystratovirt.machine.vcpu_thread"):
        thread.start()
        thread.join(10)
    assert not thread.is_alive()
    return thread, vcpu, host


def test_exits_are_dispatched_and_counted_by_kind(caplog):
    page = memoryview(bytearray(4096))
    page[0x100:0x104] = (0x11223344).to_bytes(4, "little")
    page[0x200:0x202] = b"\x01\x02"
    script = [
        exits.IoOut(0x3F8, 1, 1, 0x100, page),           # plain OUT: one element
        exits.IoOut(0x80, 1, 2, 0x200, page),            # rep outsb: two elements
        exits.IoIn(0x3FD, 1, 1, 0x300, page),            # plain IN: answered into the page
        exits.MmioWrite(0xF010_0050, 4, b"\x07\0\0\0\0\0\0\0"),
        exits.Interrupted(),
        exits.Shutdown(),                                # triple fault: the thread ends
    ]
    thread, vcpu, host = run_script(script, caplog)
    assert host.pio_bus.writes == [(0x3F8, 1, 0x44), (0x80, 1, 1), (0x80, 1, 2)]
    assert host.pio_bus.reads == [(0x3FD, 1)] and page[0x300] == 0x41
    assert host.mmio_bus.writes == [(0xF010_0050, 4, 7)]
    assert vcpu.kicks_acked == 1 and host.shutdowns == [True] and host.errors == []
    assert thread.exits == {"IoOut": 2, "IoIn": 1, "MmioWrite": 1, "Interrupted": 1, "Shutdown": 1}
    assert set(thread.exit_ns) == set(thread.exits)
    assert thread.handling_ns == sum(thread.exit_ns.values()) > 0


def test_the_exit_summary_is_not_taken_for_a_vcpu_start(caplog):
    """Kata and hydropper take the last ':INFO: Vcpu' line for the vCPUs' start: the summary a
    vCPU logs when it ends must not look like one."""
    run_script([exits.IoOut(0x80, 1, 1, 0, memoryview(bytearray(8))), exits.Shutdown()], caplog)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("Vcpu0 start running (thread id ")
    summary = [ln for ln in lines if "exits handled" in ln]
    assert summary == [summary[0]] and summary[0].startswith("vCPU 0: 2 exits handled (IoOut 1, Shutdown 1), ")
    assert not any(ln.startswith("Vcpu") for ln in lines[1:])
