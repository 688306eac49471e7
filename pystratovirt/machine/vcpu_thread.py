"""One OS thread per vCPU: runs KVM_RUN, routes port I/O and MMIO exits, obeys pause and stop.

Pause protocol: the machine sets ``want_pause`` and kicks the vCPU out of KVM_RUN; the thread
notices on its way back in, parks on the shared condition and counts itself parked; the machine
waits until every thread has parked. Only then is the guest frozen: no thread can be inside
KVM_RUN. Resume clears the flag and notifies. Stop works the same way but the thread returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from time import perf_counter_ns
from typing import Protocol

from ..cpu import pvm
from ..devices.bus import Bus
from ..kvm import exits
from ..kvm.vcpu import Vcpu
from ..memory import GuestMemory
from ..util import seccomp

log = logging.getLogger(__name__)


class VcpuHost(Protocol):
    """What a vCPU thread needs from its machine."""

    pio_bus: Bus
    mmio_bus: Bus
    pvm_compat: bool

    @property
    def memory(self) -> GuestMemory | None: ...  # None only before the machine is built

    def guest_shutdown(self, reset: bool) -> None: ...
    def fatal_error(self, message: str) -> None: ...


class PauseGate:
    """The condition all vCPU threads park on while the machine is paused or stopping."""

    def __init__(self, nr_threads: int):
        self.cond = threading.Condition()
        self.want_pause = False
        self.stopping = False
        self.parked = 0
        self.nr_threads = nr_threads
        self._waiters: list[tuple[int, Future[None]]] = []  # (count, completed once that many park)

    def park(self) -> bool:
        """Called by a vCPU thread that saw a request; returns False when the thread must end."""
        with self.cond:
            if self.stopping:
                return False
            if not self.want_pause:
                return True
            self.parked += 1
            self.cond.notify_all()
            self._wake_waiters()
            while self.want_pause and not self.stopping:
                self.cond.wait()
            self.parked -= 1
            self.cond.notify_all()
            return not self.stopping

    def when_parked(self, count: int) -> Future[None]:
        """A future completed (on the vCPU thread that parks last) once ``count`` threads are
        parked, or the machine is stopping; nobody has to block for it."""
        future: Future[None] = Future()
        with self.cond:
            self._waiters.append((count, future))
            self._wake_waiters()
        return future

    def _wake_waiters(self) -> None:  # cond held
        for count, future in list(self._waiters):
            if self.parked >= count or self.stopping:
                self._waiters.remove((count, future))
                if not future.done():
                    future.set_result(None)

    def stop(self) -> None:
        """Release every thread for good (the machine is tearing down)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            self._wake_waiters()


class VcpuThread(threading.Thread):
    def __init__(self, host: VcpuHost, vcpu: Vcpu, gate: PauseGate,
                 on_exit: Callable[[VcpuThread], None] | None = None):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.host = host
        self.vcpu = vcpu
        self.gate = gate
        self.native_id_ready = threading.Event()
        self.host_thread_id: int | None = None
        self._on_exit = on_exit
        # Exit accounting (bench/boot_time.py reports it): exits by kind, and nanoseconds from
        # KVM_RUN returning to the exit handled. Two clock reads and a dict update per exit.
        self.exits: dict[str, int] = {}
        self.exit_ns: dict[str, int] = {}
        self.handling_ns = 0

    def run(self) -> None:
        self.host_thread_id = threading.get_native_id()
        self.native_id_ready.set()
        # StratoVirt's wording: Kata and hydropper find each vCPU's start by ":INFO: Vcpu<N>".
        log.info("Vcpu%d start running (thread id %d)", self.vcpu.index, self.host_thread_id)
        try:
            seccomp.install(seccomp.ThreadKind.VCPU)  # before the first KVM_RUN
            self._loop()
        except Exception as exc:  # a VMM bug must end the VM cleanly, not leave a stuck thread
            log.exception("vCPU %d failed", self.vcpu.index)
            self.host.fatal_error(f"vCPU {self.vcpu.index} failed: {exc}")
        finally:
            # "vCPU", not StratoVirt's "Vcpu": Kata and hydropper take the last ":INFO: Vcpu" line
            # for the vCPUs' start.
            log.info("vCPU %d: %s", self.vcpu.index, self.exit_summary())
            if self._on_exit:
                self._on_exit(self)

    def exit_summary(self) -> str:
        """The VMM's share of this vCPU's time: exits handled by kind, and the time from KVM_RUN
        returning to the exit being handled (decoding it, the device's work, the PVM fix-ups)."""
        order = sorted(self.exits, key=lambda name: -self.exits[name])
        kinds = ", ".join(f"{name} {self.exits[name]}" for name in order)
        times = ", ".join(f"{name} {self.exit_ns[name] / 1e6:.1f} ms" for name in order)
        total = sum(self.exits.values())
        return (f"{total} exits handled ({kinds or 'none'}), {self.handling_ns / 1e6:.1f} ms in the "
                f"VMM handling them ({times or 'none'})")

    def _loop(self) -> None:
        vcpu, gate, counts, exit_ns = self.vcpu, self.gate, self.exits, self.exit_ns
        while True:
            if gate.want_pause or gate.stopping:
                # KVM finishes an I/O or MMIO exit (the value an IN read, RIP past the
                # instruction) only on the next KVM_RUN. Enter it once with immediate_exit set:
                # KVM completes the exit and returns at once without running guest code, so a
                # paused vCPU's registers are whole (a snapshot taken now must not replay the
                # instruction). A string instruction may need another exit first; handle it and
                # come back here.
                vcpu.immediate_exit = True
                exit_ = vcpu.run()
                if type(exit_) is not exits.Interrupted:
                    if not self._handle(exit_):
                        return
                    continue
                vcpu.ack_kick()
                if not gate.park():
                    return
                continue
            exit_ = vcpu.run()
            go_on = self._handle(exit_)
            ns = perf_counter_ns() - vcpu.left_guest_ns
            self.handling_ns += ns
            name = type(exit_).__name__
            counts[name] = counts.get(name, 0) + 1
            exit_ns[name] = exit_ns.get(name, 0) + ns
            if not go_on:
                return

    def _handle(self, exit_: exits.Exit) -> bool:
        """Act on one exit; False when the thread must end."""
        vcpu, host = self.vcpu, self.host
        # type(exit_) is tested in each branch (not kept in a local) so mypy narrows exit_ there.
        if type(exit_) is exits.IoOut:
            size = exit_.size
            pio = host.pio_bus
            if exit_.count == 1:  # a plain OUT (rep outs is rare): no list of elements
                pio.write(exit_.port, size, int.from_bytes(exit_.data, "little"))
            else:
                for chunk in exit_.elements():
                    pio.write(exit_.port, size, int.from_bytes(chunk, "little"))
        elif type(exit_) is exits.IoIn:
            size = exit_.size
            pio = host.pio_bus
            if exit_.count == 1:
                exit_.complete(pio.read(exit_.port, size).to_bytes(size, "little"))
            else:
                exit_.complete(b"".join(pio.read(exit_.port, size).to_bytes(size, "little")
                                        for _ in range(exit_.count)))
        elif type(exit_) is exits.MmioWrite:
            host.mmio_bus.write(exit_.addr, exit_.len, int.from_bytes(exit_.data[:exit_.len], "little"))
        elif type(exit_) is exits.MmioRead:
            exit_.complete(host.mmio_bus.read(exit_.addr, exit_.len).to_bytes(exit_.len, "little"))
        elif type(exit_) is exits.Interrupted:
            vcpu.ack_kick()
        elif type(exit_) is exits.Shutdown:
            # A triple fault: on x86 that is how a reboot ends up (reboot=t, or a failed reboot=k).
            log.info("vCPU %d: triple fault (guest reset)", vcpu.index)
            host.guest_shutdown(reset=True)
            return False
        elif type(exit_) is exits.SystemEvent:
            reset = exit_.type == exits.SystemEventType.RESET
            log.info("vCPU %d: system event %s", vcpu.index, exit_.type)
            host.guest_shutdown(reset=reset)
            return False
        elif type(exit_) is exits.InternalError:
            return self._internal_error(exit_)
        elif type(exit_) is exits.Hlt:
            # With an in-kernel irqchip KVM handles HLT itself; seeing it means a halted vCPU
            # with interrupts off for good.
            log.info("vCPU %d halted with interrupts disabled", vcpu.index)
            gate_wait_forever(self.gate)
            return False
        else:
            host.fatal_error(f"vCPU {vcpu.index}: unexpected KVM exit {exit_}")
            return False
        return True

    def _internal_error(self, exit_: exits.InternalError) -> bool:
        if exit_.is_emulation_failure and self.host.pvm_compat:
            try:
                memory = self.host.memory
                assert memory is not None  # vCPUs run only in a built machine
                note = pvm.handle_emulation_failure(self.vcpu, exit_, memory)
            except pvm.UnhandledEmulationFailure as exc:
                self.host.fatal_error(f"vCPU {self.vcpu.index}: {exc}")
                return False
            log.debug("vCPU %d: %s", self.vcpu.index, note)
            return True
        try:
            regs = self.vcpu.get_regs()
            where = f" at RIP {regs.rip:#x}"
        except OSError:
            where = ""
        self.host.fatal_error(f"vCPU {self.vcpu.index}: {exit_.describe()}{where}")
        return False


def gate_wait_forever(gate: PauseGate) -> None:
    with gate.cond:
        gate.cond.wait_for(lambda: gate.stopping)
