"""The micro-VM: assembles memory, KVM, devices, the kernel and the vCPU threads from a VmConfig,
runs the control loop, and executes typed management requests (QMP's back end).

Threads: the caller's thread runs the control loop (:meth:`MicroVm.run`); one thread per vCPU.
Requests arrive on the loop thread through :meth:`MicroVm.execute`; guest-driven happenings
(reset, power-off, a fatal error) come from vCPU threads and are handed to the loop with
``call_soon_threadsafe``, so every state change of the machine happens on the loop thread.

Lifecycle: created -> (built) -> running <-> paused -> shut down. The process ends after a
SHUTDOWN: StratoVirt never reboots a guest, and neither do we.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
from typing import Callable

from .. import boot
from ..cpu import pvm
from ..cpu import CpuModel, Topology, configure_vcpu
from ..devices.bus import Bus
from ..devices.i8042 import I8042
from ..devices.irq import IrqLine
from ..devices.serial import SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN, Serial
from ..kvm import Kvm
from ..kvm.vcpu import install_kick_signal
from ..memory import GuestMemory, layout
from . import requests as rq
from .vcpu_thread import PauseGate, VcpuThread
from .vmconfig import VmConfig

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 10.0   # seconds to wait for every vCPU to leave KVM_RUN
JOIN_TIMEOUT = 5.0
QOM_PATH = "/machine/unattached/device[{}]"


class MachineBuildError(Exception):
    """The VM could not be built; the message is one sentence for the user."""


class MicroVm:
    def __init__(self, config: VmConfig, loop, *, serial_sink: Callable[[bytes], None] | None = None):
        self.config = config
        self.loop = loop
        self.events: rq.EventSink | None = None  # the QMP server, wired by the front end
        self._serial_sink = serial_sink or (lambda data: None)
        self.state = rq.RunState.PRELAUNCH
        self.exit_code: int | None = None
        self.shutdown_reason: rq.ShutdownReason | None = None
        self.memory: GuestMemory | None = None
        self.kvm: Kvm | None = None
        self.vm = None
        self.vcpus = []
        self.threads: list[VcpuThread] = []
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.serial: Serial | None = None
        self.boot_info = None
        self.pvm_compat = False
        self.topology: Topology | None = None
        self._gate: PauseGate | None = None
        self._shutting_down = False
        self._on_shutdown: list[Callable[[], None]] = []

    # -- building -------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.config
        mcfg = cfg.machine
        if mcfg.mem_path:
            raise MachineBuildError("-mem-path (file-backed guest memory) is not supported yet.")
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(layout.TSS_ADDR)
        self.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2(speaker_dummy=True)

        self.memory = GuestMemory(mcfg.mem_size)
        if not mcfg.dump_guest_core:
            self.memory.advise(mmap.MADV_DONTDUMP)
        for region in self.memory.regions:
            self.vm.set_user_memory_region(region.slot, region.gpa, region.size,
                                           self.memory.host_base + region.offset)

        self._build_legacy_devices()

        cmdline = cfg.boot.cmdline
        self.pvm_compat = pvm.detect()
        if self.pvm_compat:
            extra = pvm.guest_cmdline_options()
            cmdline = f"{cmdline} {extra}".strip()
            log.info("host KVM emulates guest ring 0 (kvm_pvm): added guest kernel options: %s", extra)
        try:
            self.boot_info = boot.load_kernel(self.memory, cfg.boot.kernel, cmdline, cfg.boot.initrd,
                                              nr_cpus=mcfg.vcpus, max_cpus=mcfg.max_vcpus,
                                              extract_payload=cfg.extract_payload)
        except boot.BootError as exc:
            raise MachineBuildError(str(exc)) from None
        log.info("kernel %s loaded as %s, entry %#x", cfg.boot.kernel, self.boot_info.kind,
                 self.boot_info.entry)
        for note in self.boot_info.notes:
            log.info("boot: %s", note)
        log.info("guest command line: %s", cmdline)

        self.topology = Topology.for_cpus(mcfg.vcpus, mcfg.max_vcpus)
        model = CpuModel.from_kvm(self.kvm, self.topology)
        msr_index_list = self.kvm.get_msr_index_list()
        for index in range(mcfg.vcpus):
            vcpu = self.vm.create_vcpu(index)
            boot_cpu = index == 0
            skipped = configure_vcpu(vcpu, index, kvm=self.kvm, model=model, msr_index_list=msr_index_list,
                                     entry_rip=self.boot_info.entry if boot_cpu else None,
                                     boot_params_addr=self.boot_info.boot_params if boot_cpu else None)
            if skipped and boot_cpu:
                log.info("MSRs this host does not support, left alone: %s",
                         ", ".join(f"{m:#x}" for m in skipped))
            self.vcpus.append(vcpu)

    def _build_legacy_devices(self) -> None:
        self.serial = Serial(IrqLine(SERIAL_IRQ, lambda level: self.vm.irq_line(SERIAL_IRQ, level)),
                             self._serial_sink)
        self.pio_bus.insert(SERIAL_PORT_BASE, SERIAL_PORT_LEN, self.serial)
        self.pio_bus.insert(I8042.BASE, I8042.LENGTH, I8042(lambda: self.guest_shutdown(reset=True)))

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the vCPU threads (parked at once with ``-S``); call from the main thread."""
        install_kick_signal()
        self._gate = PauseGate(len(self.vcpus))
        self._gate.want_pause = self.config.freeze
        for vcpu in self.vcpus:
            thread = VcpuThread(self, vcpu, self._gate)
            self.threads.append(thread)
            thread.start()
        for thread in self.threads:
            thread.native_id_ready.wait(JOIN_TIMEOUT)
        self.state = rq.RunState.PAUSED if self.config.freeze else rq.RunState.RUNNING
        log.info("VM %s started with %d vCPU(s), %d MiB%s", self.config.name, len(self.vcpus),
                 self.config.machine.mem_size >> 20, " (paused: -S)" if self.config.freeze else "")

    def run(self) -> int:
        """Run the control loop until the VM shuts down; returns the process exit code."""
        try:
            self.loop.run()
        finally:
            self.teardown()
        return self.exit_code if self.exit_code is not None else 0

    def add_shutdown_hook(self, fn: Callable[[], None]) -> None:
        self._on_shutdown.append(fn)

    # -- lifecycle (loop thread) ----------------------------------------------------------------
    def pause(self) -> None:
        gate = self._gate
        with gate.cond:
            gate.want_pause = True
        for vcpu in self.vcpus:
            vcpu.kick()
        if not gate.wait_parked(len(self.threads_alive()), PAUSE_TIMEOUT):
            with gate.cond:
                gate.want_pause = False
                gate.cond.notify_all()
            raise rq.MachineError("Failed to pause the vCPUs in time.")
        self.state = rq.RunState.PAUSED

    def resume(self) -> None:
        gate = self._gate
        with gate.cond:
            gate.want_pause = False
            gate.cond.notify_all()
        self.state = rq.RunState.RUNNING

    def threads_alive(self) -> list[VcpuThread]:
        return [t for t in self.threads if t.is_alive()]

    def emit(self, event) -> None:
        if self.events is not None:
            self.events.emit(event)

    def shutdown(self, reason: rq.ShutdownReason, *, guest: bool, exit_code: int = 0) -> None:
        """Emit SHUTDOWN, stop the vCPUs and end the control loop (loop thread only)."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.shutdown_reason = reason
        self.exit_code = exit_code
        self.state = rq.RunState.SHUTDOWN
        log.info("VM %s shutting down: %s", self.config.name, reason.value)
        self.emit(rq.ShutdownEvent(guest=guest, reason=reason))
        self.loop.call_soon_threadsafe(self.loop.stop)

    def guest_shutdown(self, reset: bool) -> None:
        """A guest reset or power-off (any thread)."""
        reason = rq.ShutdownReason.GUEST_RESET if reset else rq.ShutdownReason.GUEST_SHUTDOWN
        self.loop.call_soon_threadsafe(lambda: self.shutdown(reason, guest=True))

    def host_signal(self) -> None:
        """SIGTERM/SIGINT (any thread)."""
        self.loop.call_soon_threadsafe(
            lambda: self.shutdown(rq.ShutdownReason.HOST_SIGNAL, guest=False))

    def fatal_error(self, message: str) -> None:
        """The VM cannot go on (any thread): say why, end with exit code 1."""
        log.error("%s", message)
        print(f"stratovirt: {message}", file=sys.stderr, flush=True)

        def stop() -> None:
            if self._shutting_down:
                return
            self._shutting_down = True
            self.exit_code = 1
            self.state = rq.RunState.INTERNAL_ERROR
            self.loop.stop()
        self.loop.call_soon_threadsafe(stop)

    def teardown(self) -> None:
        gate = self._gate
        if gate is not None:
            with gate.cond:
                gate.stopping = True
                gate.cond.notify_all()
            for vcpu in self.vcpus:
                vcpu.kick()
            for thread in self.threads:
                thread.join(JOIN_TIMEOUT)
                if thread.is_alive():
                    log.warning("vCPU thread %s did not stop", thread.name)
        for fn in self._on_shutdown:
            try:
                fn()
            except Exception:
                log.exception("shutdown hook failed")
        self._on_shutdown.clear()

    # -- management requests (loop thread) --------------------------------------------------------
    def execute(self, request: rq.Request) -> object:
        handler = _HANDLERS.get(type(request))
        if handler is None:
            raise rq.MachineError("This command is not supported by this VMM yet.")
        return handler(self, request)

    def _q_status(self, _req) -> rq.StatusInfo:
        return rq.StatusInfo(status=self.state)

    def _q_cpus(self, _req) -> list[rq.CpuInfo]:
        return [rq.CpuInfo(cpu_index=t.vcpu.index, props=rq.CpuProps(socket_id=t.vcpu.index),
                           qom_path=QOM_PATH.format(t.vcpu.index), thread_id=t.host_thread_id or 0)
                for t in self.threads]

    def _q_hotpluggable(self, _req) -> list[rq.HotpluggableCpu]:
        online = len(self.threads)
        return [rq.HotpluggableCpu(props=rq.CpuProps(socket_id=i),
                                   qom_path=QOM_PATH.format(i) if i < online else None)
                for i in range(self.config.machine.max_vcpus)]

    def _q_stop(self, _req) -> None:
        if self.state is not rq.RunState.RUNNING:
            raise rq.MachineError(f"The VM is not running (it is {self.state.value}).")
        self.pause()
        self.emit(rq.StopEvent())

    def _q_cont(self, _req) -> None:
        if self.state not in (rq.RunState.PAUSED, rq.RunState.PRELAUNCH):
            raise rq.MachineError(f"The VM is not paused (it is {self.state.value}).")
        self.resume()
        self.emit(rq.ResumeEvent())

    def _q_quit(self, _req) -> None:
        # The seed's transcript: the SHUTDOWN event comes before quit's {"return":{}}.
        self.shutdown(rq.ShutdownReason.HOST_QMP_QUIT, guest=False)


_HANDLERS = {
    rq.QueryStatus: MicroVm._q_status,
    rq.QueryCpus: MicroVm._q_cpus,
    rq.QueryHotpluggableCpus: MicroVm._q_hotpluggable,
    rq.Stop: MicroVm._q_stop,
    rq.Cont: MicroVm._q_cont,
    rq.Quit: MicroVm._q_quit,
}
