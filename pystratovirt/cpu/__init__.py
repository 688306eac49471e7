"""cpu layer: the guest CPU model (CPUID, topology), initial vCPU state, ring-0-emulation compat,
and the saved state of vCPUs and in-kernel devices (``state``).

Sits above ``pystratovirt.kvm``, ``pystratovirt.memory`` and ``pystratovirt.boot``, below the
machine: it decides what each vCPU looks like, how the boot vCPU starts, and what KVM state a
snapshot holds, but runs nothing.
"""

from .cpuid import MAX_VCPUS, CpuModel, Topology
from .regs import configure_application_processor, configure_boot_cpu, configure_vcpu

__all__ = ["MAX_VCPUS", "CpuModel", "Topology", "configure_application_processor",
           "configure_boot_cpu", "configure_vcpu"]
