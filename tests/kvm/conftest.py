"""Fixtures for the kvm-layer tests: real-mode guests on the real /dev/kvm."""

from __future__ import annotations

import pytest

from kvm.kvm_guest_helpers import RealModeGuest


@pytest.fixture
def guest_factory(kvm):
    """make(code_hex, irqchip=False, pit=False) -> RealModeGuest; all are closed afterwards."""
    made = []

    def make(code_hex: str, **kw):
        guest = RealModeGuest(kvm, bytes.fromhex(code_hex), **kw)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.close()
