"""kvm layer: thin, typed wrappers over the /dev/kvm ioctl interface (system, VM, vCPU, exits).

Nothing above this package issues a KVM ioctl itself. The layer knows nothing of guest layout,
devices or CPU models; those live in ``pystratovirt.memory``, ``pystratovirt.devices`` and
``pystratovirt.cpu``.

Inside the package the modules depend one way: ``system`` (/dev/kvm) -> ``vm`` -> ``vcpu`` ->
``exits`` and ``ioctl`` -> ``structs``. A Vm or Vcpu is handed the values it needs from above when
it is created and holds no reference back to its creator.
"""

from .exits import (
    Debug,
    Exit,
    ExitReason,
    FailEntry,
    Hlt,
    InternalError,
    InternalSuberror,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    SystemEventType,
    Unknown,
    decode_exit,
)
from .ioctl import Cap
from .structs import CpuidEntry
from .system import DEFAULT_KVM_PATH, Kvm, KvmUnavailableError
from .vcpu import KICK_SIGNAL, MsrAccessError, Translation, Vcpu, install_kick_signal
from .vm import Vm

__all__ = [
    "Cap", "CpuidEntry", "DEFAULT_KVM_PATH", "Debug", "Exit", "ExitReason", "FailEntry", "Hlt",
    "InternalError", "InternalSuberror", "Interrupted", "IoIn", "IoOut", "KICK_SIGNAL", "Kvm",
    "KvmUnavailableError", "MmioRead", "MmioWrite", "MsrAccessError", "Shutdown", "SystemEvent",
    "SystemEventType", "Translation", "Unknown", "Vcpu", "Vm", "decode_exit",
    "install_kick_signal",
]
