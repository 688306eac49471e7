"""Fixtures for the cpu-layer tests: a shared /dev/kvm handle, or a clean skip without one."""

import pytest

from pystratovirt.kvm import Kvm, KvmUnavailableError


@pytest.fixture(scope="session")
def kvm():
    try:
        handle = Kvm()
    except KvmUnavailableError as exc:
        pytest.skip(str(exc))
    yield handle
    handle.close()
