"""One KVM virtual machine: its fd, memory slots, in-kernel devices and their state, eventfd
wiring, vCPUs.

Create it with :meth:`pystratovirt.kvm.Kvm.create_vm`. The package's modules depend one way:
``system`` (/dev/kvm) creates a :class:`Vm`, which creates :class:`~.vcpu.Vcpu` objects; a Vm
gets what it needs from /dev/kvm (the kvm_run mapping size) as a value, not a back-reference. When the host offers
KVM_CAP_EXIT_ON_EMULATION_FAILURE, ``create_vm`` enables it (``exit_on_emulation_failure``
below records that). What the capability changes, per the KVM API documentation:

* every failure of KVM's instruction emulator becomes a KVM_EXIT_INTERNAL_ERROR with suberror
  KVM_INTERNAL_ERROR_EMULATION, including failures in guest user mode, which KVM would otherwise
  answer by injecting #UD into the guest;
* the exit carries the bytes of the failing instruction (``emulation_failure.insn_bytes``,
  flagged by KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES), so the VMM can report or
  finish the instruction without walking guest page tables itself.

On a host whose KVM emulates guest ring 0 (see :mod:`pystratovirt.cpu.pvm`) that is what lets the
VMM step over the few instructions the emulator lacks.
"""

from __future__ import annotations

import os

from . import ioctl as k
from . import structs as s
from .vcpu import Vcpu


class Vm:
    """A KVM VM fd; every method is one ioctl and raises OSError when KVM refuses."""

    def __init__(self, fd: int, vcpu_mmap_size: int):
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size  # KVM_GET_VCPU_MMAP_SIZE of /dev/kvm
        self.exit_on_emulation_failure = False  # set by Kvm.create_vm once the cap is enabled

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some answers are per-VM)."""
        return k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        if len(args) > 4:
            raise ValueError("kvm_enable_cap takes at most 4 arguments")
        req = s.kvm_enable_cap(cap=int(cap), flags=flags)
        for i, arg in enumerate(args):
            req.args[i] = arg
        k.ioctl(self.fd, k.KVM_ENABLE_CAP, req)

    # -- memory --------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        """Map ``size`` bytes at host ``host_addr`` into guest physical ``gpa`` as ``slot``.

        ``size`` 0 deletes the slot. ``flags``: structs.KVM_MEM_LOG_DIRTY_PAGES / KVM_MEM_READONLY.
        """
        region = s.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                               memory_size=size, userspace_addr=host_addr)
        k.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        """Three pages of guest physical space KVM may use for its real-mode TSS (Intel)."""
        k.ioctl(self.fd, k.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """One page of guest physical space for the EPT identity map (Intel, unrestricted off)."""
        value = s.u64(addr)
        k.ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, value)

    # -- in-kernel devices ---------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC pair, IOAPIC and per-vCPU local APICs; call before creating vCPUs."""
        k.ioctl(self.fd, k.KVM_CREATE_IRQCHIP)

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        """In-kernel i8254 PIT; ``speaker_dummy`` also emulates port 0x61 as a dummy speaker."""
        cfg = s.kvm_pit_config(flags=s.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0)
        k.ioctl(self.fd, k.KVM_CREATE_PIT2, cfg)

    # -- in-kernel device state (save/restore) -------------------------------------------------
    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        """One in-kernel interrupt controller's state (KVM_GET_IRQCHIP); ``chip_id`` is
        structs.KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE or KVM_IRQCHIP_IOAPIC."""
        chip = s.kvm_irqchip(chip_id=chip_id)
        k.ioctl(self.fd, k.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        """Load the state of the controller named by ``chip.chip_id`` (KVM_SET_IRQCHIP)."""
        k.ioctl(self.fd, k.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.kvm_pit_state2:
        """The in-kernel PIT's three channels and flags (KVM_GET_PIT2)."""
        state = s.kvm_pit_state2()
        k.ioctl(self.fd, k.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: s.kvm_pit_state2) -> None:
        """Load PIT state (KVM_SET_PIT2). KVM reloads each channel's count as of now: the part
        of the current period that had elapsed when the state was read starts over."""
        k.ioctl(self.fd, k.KVM_SET_PIT2, state)

    def get_clock(self) -> s.kvm_clock_data:
        """The VM's kvmclock in ns, with host realtime/TSC at the same instant where the flags say
        so (KVM_GET_CLOCK)."""
        data = s.kvm_clock_data()
        k.ioctl(self.fd, k.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: s.kvm_clock_data) -> None:
        """Set the kvmclock to ``data.clock`` (KVM_SET_CLOCK); with KVM_CLOCK_REALTIME in
        ``data.flags`` KVM adds the host realtime that has passed since ``data.realtime``."""
        k.ioctl(self.fd, k.KVM_SET_CLOCK, data)

    def irq_line(self, irq: int, level: int) -> None:
        """Drive GSI ``irq`` to ``level`` (0/1) on the in-kernel irqchip."""
        req = s.kvm_irq_level(level=level)
        req.irq = irq
        k.ioctl(self.fd, k.KVM_IRQ_LINE, req)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False, resample_fd: int | None = None) -> None:
        """Have each write to eventfd ``fd`` raise GSI ``gsi`` (or undo that with ``deassign``)."""
        flags = s.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        req = s.kvm_irqfd(fd=fd, gsi=gsi, flags=flags)
        if resample_fd is not None:
            req.flags |= s.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = resample_fd
        k.ioctl(self.fd, k.KVM_IRQFD, req)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """Have guest writes of ``length`` bytes to ``addr`` signal eventfd ``fd`` without an exit.

        ``datamatch`` restricts it to writes of that value; ``pio`` selects port IO instead of MMIO.
        A deassign must repeat the same addr/length/datamatch/pio it was assigned with.
        """
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length {length} must be 0, 1, 2, 4 or 8")
        flags = 0
        if datamatch is not None:
            flags |= s.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= s.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= s.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        k.ioctl(self.fd, k.KVM_IOEVENTFD, req)

    # -- vCPUs ---------------------------------------------------------------------------------
    def create_vcpu(self, index: int) -> Vcpu:
        """Create vCPU ``index`` (also its initial APIC id) and map its kvm_run page."""
        # The XSAVE area size KVM_GET_XSAVE2/KVM_SET_XSAVE move (0: no KVM_GET_XSAVE2 on this host).
        xsave2_size = self.check_extension(k.Cap.XSAVE2)
        fd = k.ioctl(self.fd, k.KVM_CREATE_VCPU, index)
        try:
            return Vcpu(index, fd, self.vcpu_mmap_size, xsave2_size=xsave2_size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
