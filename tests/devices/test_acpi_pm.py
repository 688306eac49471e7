"""The hardware-reduced ACPI sleep registers: S5 powers off, other states wake at once."""

import logging

import pytest

from pystratovirt.devices.acpi_pm import SLP_EN, SLP_TYP_S5, WAK_STS, AcpiPm
from pystratovirt.devices.bus import Bus
from pystratovirt.memory.layout import ACPI_SLEEP_CONTROL_PORT as CTRL
from pystratovirt.memory.layout import ACPI_SLEEP_STATUS_PORT as STS


@pytest.fixture
def pm():
    calls = []
    bus = Bus("pio")
    dev = AcpiPm(lambda: calls.append("off"))
    bus.insert(AcpiPm.BASE, AcpiPm.LENGTH, dev)
    return bus, calls


def sleep_control(slp_typ, enable=True):
    return (slp_typ << 2) | (SLP_EN if enable else 0)


def test_linux_s5_sequence_powers_off(pm):
    bus, calls = pm
    # acpi_hw_extended_sleep: clear WAK_STS, then SLP_TYP | SLP_EN in one byte write
    bus.write(STS, 1, WAK_STS)
    assert calls == []
    bus.write(CTRL, 1, sleep_control(SLP_TYP_S5))
    assert calls == ["off"]
    assert sleep_control(SLP_TYP_S5) == 0x34


def test_slp_typ_without_slp_en_does_nothing(pm):
    bus, calls = pm
    bus.write(CTRL, 1, sleep_control(SLP_TYP_S5, enable=False))
    assert calls == [] and bus.read(STS, 1) == 0


@pytest.mark.parametrize("slp_typ", [0, 1, 3, 4, 6, 7])
def test_other_sleep_states_wake_at_once(pm, caplog, slp_typ):
    bus, calls = pm
    with caplog.at_level(logging.WARNING, logger="pystratovirt.devices.acpi_pm"):
        bus.write(CTRL, 1, sleep_control(slp_typ))
    assert calls == []
    assert f"sleep type {slp_typ}" in caplog.text
    assert bus.read(STS, 1) == WAK_STS       # an OSPM polling for WAK_STS carries on
    bus.write(STS, 1, 0x7F)                  # writing 0 to bit 7 leaves it set
    assert bus.read(STS, 1) == WAK_STS
    bus.write(STS, 1, WAK_STS)               # write 1 to clear
    assert bus.read(STS, 1) == 0


def test_control_register_reads_zero(pm):
    bus, _ = pm
    bus.write(CTRL, 1, sleep_control(3))
    assert bus.read(CTRL, 1) == 0


def test_wide_access_is_split_per_register(pm):
    bus, calls = pm
    bus.write(CTRL, 1, sleep_control(1))             # WAK_STS now set
    assert bus.read(CTRL, 2) == WAK_STS << 8         # control byte 0, status byte 0x80
    bus.write(CTRL, 2, (WAK_STS << 8) | sleep_control(SLP_TYP_S5))
    assert calls == ["off"] and bus.read(STS, 1) == 0


def test_ports_outside_the_device_are_not_claimed(pm):
    bus, calls = pm
    assert bus.read(CTRL + 2, 1) == 0xFF
    bus.write(CTRL - 1, 1, 0x34)
    assert calls == []
    assert (AcpiPm.BASE, AcpiPm.LENGTH) == (0x600, 2) and STS == CTRL + 1


def test_state_round_trip():
    from pystratovirt.devices.acpi_pm import AcpiPmState
    dev = AcpiPm(lambda: None)
    assert dev.save_state() == AcpiPmState(False)
    copy = AcpiPm(lambda: None)
    copy.restore_state(AcpiPmState(True))
    assert copy.save_state() == AcpiPmState(True)
