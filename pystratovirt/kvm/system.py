"""The KVM system handle: /dev/kvm, its API version, capabilities, and host-wide queries.

:class:`Kvm` is the root of the kvm layer: it checks that the host can run VMs at all (turning
every way that can fail into a :class:`KvmUnavailableError` whose message is one sentence a user
can act on), answers KVM_CHECK_EXTENSION, and creates :class:`~.vm.Vm` objects.
"""

from __future__ import annotations

import errno
import os

from ..errors import PyStratoVirtError
from . import ioctl as k
from . import structs as s
from .structs import CpuidEntry
from .vm import Vm

DEFAULT_KVM_PATH = "/dev/kvm"

# KVM_GET_SUPPORTED_CPUID needs a buffer at least as large as its answer and says E2BIG otherwise;
# start where current hosts fit and grow to the kernel's own limit (KVM_MAX_CPUID_ENTRIES = 256).
_CPUID_ENTRIES_START = 100
_CPUID_ENTRIES_MAX = 4096


class KvmUnavailableError(PyStratoVirtError):
    """This host cannot run KVM guests; str() is one sentence saying why."""


def _reason(exc: OSError) -> str:
    """The C library's words for an OSError's errno (without the ioctl detail)."""
    return os.strerror(exc.errno) if exc.errno is not None else str(exc)


def _open_error_sentence(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return (f"KVM is not available: {path} does not exist (is the kvm module loaded, "
                f"and does this CPU support virtualisation?)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"KVM is not available: permission denied opening {path} (add this user to the "
                f"group that owns it, usually 'kvm', or run as root).")
    if exc.errno in (errno.ENXIO, errno.ENODEV):
        return (f"KVM is not available: {path} exists but no KVM driver answers it (load "
                f"kvm_intel or kvm_amd, and check that virtualisation is enabled in the firmware).")
    return f"KVM is not available: opening {path} failed ({_reason(exc)})."


class Kvm:
    """An open /dev/kvm with API version 12."""

    def __init__(self, path: str = DEFAULT_KVM_PATH):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailableError(_open_error_sentence(path, exc)) from None
        try:
            try:
                version = k.ioctl(self.fd, k.KVM_GET_API_VERSION)
            except OSError as exc:
                raise KvmUnavailableError(
                    f"KVM is not available: {path} is not a KVM device "
                    f"(KVM_GET_API_VERSION failed: {_reason(exc)}).") from None
            if version != k.KVM_API_VERSION:
                raise KvmUnavailableError(
                    f"KVM is not available: {path} speaks KVM API version {version}, "
                    f"but this VMM needs version {k.KVM_API_VERSION}.")
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.api_version = version

    # -- queries -------------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 when absent, else a capability-specific value."""
        return k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        """Size of the kvm_run mapping of each vCPU (kvm_run plus the PIO data page and more)."""
        return k.ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """Every CPUID leaf KVM can present to a guest on this host, with its host-derived values."""
        return self._cpuid_query(k.KVM_GET_SUPPORTED_CPUID)

    def _cpuid_query(self, request: int) -> list[CpuidEntry]:
        count = _CPUID_ENTRIES_START
        while True:
            buf = s.kvm_cpuid2_with(count)
            try:
                k.ioctl(self.fd, request, buf)
            except OSError as exc:
                if exc.errno == errno.E2BIG and count < _CPUID_ENTRIES_MAX:
                    count *= 2
                    continue
                raise
            return s.entries_from_cpuid2(buf)

    def get_msr_index_list(self) -> list[int]:
        """The MSRs KVM saves/restores or emulates for guests (KVM_GET_MSR_INDEX_LIST)."""
        return self._msr_list(k.KVM_GET_MSR_INDEX_LIST)

    def get_msr_feature_index_list(self) -> list[int]:
        """The read-only feature MSRs (KVM_GET_MSR_FEATURE_INDEX_LIST)."""
        return self._msr_list(k.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def _msr_list(self, request: int) -> list[int]:
        # The first call with room for nothing reports the real count through E2BIG.
        probe = s.kvm_msr_list_with(0)
        try:
            k.ioctl(self.fd, request, probe)
        except OSError as exc:
            if exc.errno != errno.E2BIG:
                raise
        lst = s.kvm_msr_list_with(probe.nmsrs)
        k.ioctl(self.fd, request, lst)
        return list(lst.indices[:lst.nmsrs])

    # -- VMs -----------------------------------------------------------------------------------
    def create_vm(self, *, exit_on_emulation_failure: bool = True) -> Vm:
        """Create a VM (see :class:`~.vm.Vm` for what ``exit_on_emulation_failure`` does)."""
        fd = k.ioctl(self.fd, k.KVM_CREATE_VM, 0)
        try:
            vm = Vm(fd, self.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        if exit_on_emulation_failure and self.check_extension(k.Cap.EXIT_ON_EMULATION_FAILURE):
            try:
                vm.enable_cap(k.Cap.EXIT_ON_EMULATION_FAILURE, 1)
            except BaseException:
                vm.close()
                raise
            vm.exit_on_emulation_failure = True
        return vm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a best-effort fd release for objects dropped without close()
        try:
            self.close()
        except Exception:
            pass
