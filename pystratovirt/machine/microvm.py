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
import stat as statmod
import sys
from typing import Callable

from .. import boot
from ..cpu import pvm
from ..cpu import CpuModel, Topology, configure_vcpu
from ..boot.acpi import write_acpi_tables
from ..devices.acpi_pm import AcpiPm
from ..devices.bus import Bus
from ..devices.i8042 import I8042
from ..devices.irq import IrqLine
from ..devices.serial import SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN, Serial
from ..kvm import Kvm
from ..kvm.vcpu import install_kick_signal
from ..memory import GuestMemory, layout
from . import requests as rq
from .fds import Descriptors
from ..virtio.balloon import VirtioBalloon
from ..virtio.blk import BackendError, FileBackend, VirtioBlk
from ..virtio.net import VirtioNet
from ..virtio.tap import Tap, TapError
from ..virtio.vhost_net import VhostNetError, open_vhost_net
from .mmio_devices import BALLOON_WINDOW, BLOCK_WINDOW_FIRST, NET_WINDOW_FIRST, MmioDevices
from .slots import BLOCK_SLOTS, NET_SLOTS, BackendOpenError, ReplaceableSlots, SlotKind
from .vcpu_thread import PauseGate, VcpuThread
from .vmconfig import VmConfig

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 10.0   # seconds to wait for every vCPU to leave KVM_RUN
# qom-get/qom-set on the balloon: QEMU's type and property names.
BALLOON_TYPE = "virtio-balloon-device"
STATS_PROPERTY = "guest-stats"
STATS_INTERVAL_PROPERTY = "guest-stats-polling-interval"
BALLOON_EVENT_INTERVAL = 1.0  # BALLOON_CHANGED at most this often while the guest's size moves
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
        # Descriptors inherited at start-up or passed with getfd; backends take them from here.
        self.fds = Descriptors.from_process()
        self.add_shutdown_hook(self.fds.close)
        self.mmio_devices: MmioDevices | None = None
        self.slots: ReplaceableSlots | None = None
        self.balloon: VirtioBalloon | None = None
        self._balloon_timer = None
        self._balloon_reported: int | None = None
        self._stats_interval = 0  # seconds; 0: the guest's statistics are not polled
        self._stats_timer = None

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
        if mcfg.mem_prealloc:
            self.memory.populate()
        if not mcfg.dump_guest_core:
            self.memory.advise(mmap.MADV_DONTDUMP)
        for region in self.memory.regions:
            self.vm.set_user_memory_region(region.slot, region.gpa, region.size,
                                           self.memory.host_base + region.offset)

        self._build_legacy_devices()
        self._build_virtio_devices()

        cmdline = f"{cfg.boot.cmdline} {self.mmio_devices.cmdline()}".strip()
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
        try:
            write_acpi_tables(self.memory, nr_cpus=mcfg.vcpus, max_cpus=mcfg.max_vcpus,
                              virtio_devices=self.mmio_devices.acpi_resources(),
                              serial_ports=[(SERIAL_PORT_BASE, SERIAL_IRQ)])
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
        self.pio_bus.insert(AcpiPm.BASE, AcpiPm.LENGTH, AcpiPm(lambda: self.guest_shutdown(reset=False)))

    def _build_virtio_devices(self) -> None:
        cfg = self.config
        self.mmio_devices = MmioDevices(self.vm, self.memory, self.mmio_bus)
        block_devices = []
        for slot in range(BLOCK_SLOTS):
            backend = None
            if slot < len(cfg.drives):
                drive = cfg.drives[slot]
                try:
                    backend = FileBackend.open(drive.path, drive.read_only, drive.direct, serial=drive.serial)
                except BackendError as exc:
                    raise MachineBuildError(str(exc)) from None
            device = VirtioBlk(backend, name=f"blk{slot}")
            self.mmio_devices.add(BLOCK_WINDOW_FIRST + slot, device)
            block_devices.append(device)
        net_devices = []
        for slot in range(NET_SLOTS):
            nic = cfg.nets[slot] if slot < len(cfg.nets) else None
            tap = None
            if nic is not None:
                try:
                    tap = self._open_backend(SlotKind.NET, nic)
                except BackendOpenError as exc:
                    raise MachineBuildError(str(exc)) from None
            device = VirtioNet(tap, mac=nic.mac if nic else None, vm_name=cfg.name, slot=slot, name=f"net{slot}")
            self.mmio_devices.add(NET_WINDOW_FIRST + slot, device)
            net_devices.append(device)
        if cfg.balloon is not None:
            self.balloon = VirtioBalloon(cfg.machine.mem_size, deflate_on_oom=cfg.balloon.deflate_on_oom,
                                         on_actual_changed=self._balloon_moved_threadsafe)
            self.mmio_devices.add(BALLOON_WINDOW, self.balloon)
        self.slots = ReplaceableSlots(block_devices, net_devices, self._open_backend)
        for slot, drive in enumerate(cfg.drives):
            self.slots.adopt(drive.id, SlotKind.BLOCK, drive, drive.path, slot)
        for slot, nic in enumerate(cfg.nets):
            self.slots.adopt(nic.id, SlotKind.NET, nic, None, slot)
        self.add_shutdown_hook(self.mmio_devices.close)

    @staticmethod
    def _open_backend(kind: SlotKind, spec) -> object:
        """Open the backend a registration describes (QMP request or boot-time config)."""
        try:
            if kind is SlotKind.BLOCK:
                return FileBackend.open(spec.filename, spec.read_only, spec.direct)
            # A boot NIC (NetConfig) or a netdev_add request (NetdevAdd).
            if isinstance(spec, rq.NetdevAdd):
                vhost, vhost_fds = spec.vhost or spec.vhostfds is not None, spec.vhostfds
                fds = [_parse_fd(spec.fds)] if spec.fds is not None else []
                ifname = spec.ifname
            else:
                vhost, vhost_fds = spec.vhost or bool(spec.vhost_fds), spec.vhost_fds
                fds, ifname = list(spec.tap_fds), spec.tap
            if vhost:
                open_vhost_net(_parse_fd(vhost_fds[0] if isinstance(vhost_fds, list) else vhost_fds)
                               if vhost_fds else None)
            return Tap.from_fd(fds[0]) if fds else Tap.open(ifname)
        except (BackendError, TapError, VhostNetError) as exc:
            raise BackendOpenError(str(exc)) from None

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
        self.mmio_devices.start()
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

    def _q_blockdev_add(self, req: rq.BlockdevAdd) -> None:
        try:
            st = os.stat(req.filename)
        except OSError as exc:
            raise rq.MachineError(f"Cannot use {req.filename}: {exc.strerror}.") from None
        if not (statmod.S_ISREG(st.st_mode) or statmod.S_ISBLK(st.st_mode)):
            raise rq.MachineError("File is not a regular file or block device")
        self.slots.register(req.node_name, SlotKind.BLOCK, req, req.filename)

    def _q_netdev_add(self, req: rq.NetdevAdd) -> None:
        # Open the tap once now, as StratoVirt does, so a missing or busy tap is reported here.
        try:
            self._open_backend(SlotKind.NET, req).close()
        except BackendOpenError as exc:
            raise rq.MachineError(str(exc)) from None
        self.slots.register(req.id, SlotKind.NET, req)

    def _q_backend_del(self, req) -> None:
        self.slots.unregister(req.node_name if isinstance(req, rq.BlockdevDel) else req.id)

    def _q_device_add(self, req: rq.DeviceAdd) -> None:
        self.slots.attach(req.id, req.driver, req.slot)

    def _q_device_del(self, req: rq.DeviceDel) -> None:
        self.slots.detach(req.id)
        self.emit(rq.DeviceDeletedEvent(device=req.id, path=req.id))

    def _active_balloon(self) -> VirtioBalloon:
        if self.balloon is None or not self.balloon.active:
            raise rq.MachineError("No balloon device has been activated", rq.ErrorClass.DEVICE_NOT_ACTIVE)
        return self.balloon

    def _q_balloon(self, req: rq.Balloon) -> None:
        self._active_balloon().set_target(req.value)

    def _q_query_balloon(self, _req) -> rq.BalloonInfo:
        return rq.BalloonInfo(actual=self._active_balloon().actual_bytes())

    # BALLOON_CHANGED: the first change is reported at once, later ones at most once per
    # interval while the size keeps moving, and the settled value always gets an event.
    def _balloon_moved_threadsafe(self, _actual: int) -> None:
        self.loop.call_soon_threadsafe(self._balloon_moved)

    def _balloon_moved(self) -> None:
        if self._balloon_timer is None:
            self._report_balloon()

    def _report_balloon(self) -> None:
        self._balloon_timer = None
        if self.balloon is None:
            return
        actual = self.balloon.actual_bytes()
        if actual == self._balloon_reported:
            return
        self._balloon_reported = actual
        self.emit(rq.BalloonChangedEvent(actual=actual))
        self._balloon_timer = self.loop.call_later(BALLOON_EVENT_INTERVAL, self._report_balloon)

    # -- qom-get / qom-set: the balloon's statistics, with QEMU's paths, names and error texts --
    def _qom_balloon(self, path: str) -> VirtioBalloon:
        if path != rq.BALLOON_QOM_PATH or self.balloon is None:
            raise rq.MachineError(f"Device '{path}' not found", rq.ErrorClass.DEVICE_NOT_FOUND)
        return self.balloon

    def _q_qom_get(self, req: rq.QomGet) -> object:
        balloon = self._qom_balloon(req.path)
        if req.property == STATS_PROPERTY:
            stats = balloon.latest_stats()
            if stats is None:
                return rq.BalloonGuestStats(last_update=0, values={})
            return rq.BalloonGuestStats(last_update=int(stats.timestamp), values=dict(stats.values))
        if req.property == STATS_INTERVAL_PROPERTY:
            return self._stats_interval
        raise rq.MachineError(f"Property '{BALLOON_TYPE}.{req.property}' not found")

    def _q_qom_set(self, req: rq.QomSet) -> None:
        self._qom_balloon(req.path)
        if req.property == STATS_PROPERTY:
            raise rq.MachineError(f"Property '{BALLOON_TYPE}.{req.property}' is not writable")
        if req.property != STATS_INTERVAL_PROPERTY:
            raise rq.MachineError(f"Property '{BALLOON_TYPE}.{req.property}' not found")
        value = req.value
        if isinstance(value, bool) or not isinstance(value, int):
            raise rq.MachineError("Invalid parameter type for 'value', expected: integer")
        if value < 0:
            raise rq.MachineError("timer value must be greater than zero")
        if value > 0xFFFFFFFF:
            raise rq.MachineError("timer value is too big")
        self._stats_interval = value
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        if value:
            self._stats_timer = self.loop.call_later(value, self._poll_stats)

    def _poll_stats(self) -> None:
        """Hand the driver its statistics buffer back, which asks it for fresh values (a guest
        that has not posted one yet, or is paused, is simply asked again next time)."""
        self._stats_timer = None
        if self.balloon is not None and self._stats_interval:
            self.balloon.request_stats()
            self._stats_timer = self.loop.call_later(self._stats_interval, self._poll_stats)


def _parse_fd(text) -> int:
    """StratoVirt's ``fds`` reference: a number, or ``name:number`` (the last field counts)."""
    try:
        return int(str(text).rsplit(":", 1)[-1])
    except ValueError:
        raise BackendOpenError(f"Add netdev error: failed to convert {text} to RawFd.") from None


_HANDLERS = {
    rq.QueryStatus: MicroVm._q_status,
    rq.QueryCpus: MicroVm._q_cpus,
    rq.QueryHotpluggableCpus: MicroVm._q_hotpluggable,
    rq.Stop: MicroVm._q_stop,
    rq.Cont: MicroVm._q_cont,
    rq.Quit: MicroVm._q_quit,
    rq.BlockdevAdd: MicroVm._q_blockdev_add,
    rq.BlockdevDel: MicroVm._q_backend_del,
    rq.NetdevAdd: MicroVm._q_netdev_add,
    rq.NetdevDel: MicroVm._q_backend_del,
    rq.DeviceAdd: MicroVm._q_device_add,
    rq.DeviceDel: MicroVm._q_device_del,
    rq.Balloon: MicroVm._q_balloon,
    rq.QueryBalloon: MicroVm._q_query_balloon,
    rq.QomGet: MicroVm._q_qom_get,
    rq.QomSet: MicroVm._q_qom_set,
    rq.GetFd: lambda vm, req: vm.fds.put(req.fdname, req.fd),
    rq.CloseFd: lambda vm, req: vm.fds.close_named(req.fdname),
}
