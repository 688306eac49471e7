"""Kvm: the one-sentence KvmUnavailableError for each failure, and real /dev/kvm queries."""

import errno
import os
import re

import pytest

from pystratovirt.kvm import Cap, Kvm, KvmUnavailableError, system
from pystratovirt.kvm import ioctl as k


def _one_sentence(text: str) -> bool:
    # One sentence: ends with a full stop (optionally after a closing bracket), and no other
    # sentence-ending ". X" inside.
    return text.endswith((".", ".)", ")")) and not re.search(r"[.!?]\s+[A-Z]", text) and "\n" not in text


def test_missing_device(tmp_path):
    path = tmp_path / "kvm"
    with pytest.raises(KvmUnavailableError) as info:
        Kvm(str(path))
    msg = str(info.value)
    assert msg == (f"KVM is not available: {path} does not exist (is the kvm module loaded, "
                   f"and does this CPU support virtualisation?)")
    assert _one_sentence(msg)


def test_permission_denied(monkeypatch):
    # Tests usually run as root, so simulate the EACCES a normal user gets.
    def deny(path, flags, *args):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(system.os, "open", deny)
    with pytest.raises(KvmUnavailableError) as info:
        Kvm("/dev/kvm")
    msg = str(info.value)
    assert msg.startswith("KVM is not available: permission denied opening /dev/kvm")
    assert "kvm" in msg and _one_sentence(msg)


def test_device_without_driver(monkeypatch):
    def nxio(path, flags, *args):
        raise OSError(errno.ENXIO, "No such device or address", path)

    monkeypatch.setattr(system.os, "open", nxio)
    with pytest.raises(KvmUnavailableError) as info:
        Kvm("/dev/kvm")
    assert "no KVM driver answers it" in str(info.value)
    assert _one_sentence(str(info.value))


def test_not_a_kvm_device():
    with pytest.raises(KvmUnavailableError) as info:
        Kvm("/dev/null")
    msg = str(info.value)
    assert msg.startswith("KVM is not available: /dev/null is not a KVM device")
    assert _one_sentence(msg)


def test_wrong_api_version(monkeypatch):
    opened = []
    real_open = os.open

    def fake_open(path, flags, *args):
        fd = real_open("/dev/null", os.O_RDONLY)
        opened.append(fd)
        return fd

    monkeypatch.setattr(system.os, "open", fake_open)
    monkeypatch.setattr(system.k, "ioctl", lambda fd, req, arg=None: 11)
    with pytest.raises(KvmUnavailableError) as info:
        Kvm("/dev/kvm")
    assert str(info.value) == ("KVM is not available: /dev/kvm speaks KVM API version 11, "
                               "but this VMM needs version 12.")
    # The fd was closed on the way out.
    with pytest.raises(OSError):
        os.fstat(opened[0])


@pytest.mark.kvm
def test_real_kvm_queries(kvm):
    assert kvm.api_version == k.KVM_API_VERSION
    assert kvm.check_extension(Cap.USER_MEMORY) == 1
    assert kvm.vcpu_mmap_size() >= 2 * 4096  # kvm_run page + PIO data page
    cpuid = kvm.get_supported_cpuid()
    functions = {e.function for e in cpuid}
    assert {0, 1, 0x8000_0000} <= functions
    leaf0 = next(e for e in cpuid if e.function == 0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine", b"CentaurHauls")
    msrs = kvm.get_msr_index_list()
    assert 0x10 in msrs  # IA32_TSC
    assert len(msrs) == len(set(msrs))


@pytest.mark.kvm
def test_create_vm_enables_exit_on_emulation_failure_when_offered(kvm):
    with kvm.create_vm() as vm:
        assert vm.exit_on_emulation_failure == bool(kvm.check_extension(Cap.EXIT_ON_EMULATION_FAILURE))
    with kvm.create_vm(exit_on_emulation_failure=False) as vm:
        assert vm.exit_on_emulation_failure is False
