"""Suite-wide options and fixtures: the probe guest build, KVM availability, the opt-in stock tier."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--stock", action="store_true", default=False,
                     help="also run the opt-in tier that boots Debian's stock cloud kernel (20+ min here)")
    parser.addoption("--no-slow", action="store_true", default=False,
                     help="skip the slow tests that build and boot the lean Linux kernel")


def pytest_collection_modifyitems(config, items):
    run_stock = config.getoption("--stock") or os.environ.get("PYSTRATOVIRT_STOCK") == "1"
    skip_slow = config.getoption("--no-slow")
    for item in items:
        if "stock" in item.keywords and not run_stock:
            item.add_marker(pytest.mark.skip(reason="stock-kernel tier is opt-in: pass --stock"))
        elif "slow" in item.keywords and skip_slow:
            item.add_marker(pytest.mark.skip(reason="--no-slow given"))


@pytest.fixture(scope="session")
def kvm_ok():
    """Skip cleanly where /dev/kvm is unusable (the VMM's own one-sentence reason)."""
    from pystratovirt.kvm import Kvm, KvmUnavailableError
    try:
        Kvm().close()
    except KvmUnavailableError as exc:
        pytest.skip(str(exc))
    return True


@pytest.fixture(scope="session")
def kvm():
    """A shared /dev/kvm handle for the kvm- and cpu-layer tests, or a clean skip without one."""
    from pystratovirt.kvm import Kvm, KvmUnavailableError
    try:
        handle = Kvm()
    except KvmUnavailableError as exc:
        pytest.skip(str(exc))
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def probe_elf(kvm_ok):
    """The probe guest, built from the repo's C sources (cached by source hash)."""
    from pystratovirt.guest.build import build_probe
    return build_probe()


@pytest.fixture(scope="session")
def lean_guest(kvm_ok):
    """The guest kit's lean kernel and initramfs (built once, then cached)."""
    from pystratovirt.guest.kit import ensure_lean_guest
    return ensure_lean_guest()


@pytest.fixture(scope="session")
def lean_acpi_guest(kvm_ok):
    """The lean kernel's ACPI-only variant (linux/lean-acpi.config), built once, then cached."""
    from pystratovirt.guest.kit import ensure_lean_guest
    return ensure_lean_guest(acpi=True)


@pytest.fixture
def ns():
    """A network namespace of the test's own (deleted afterwards), or a skip without a tun device."""
    from helpers.netns import NetNs
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this host")
    n = NetNs()
    yield n
    n.close()
