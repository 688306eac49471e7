"""Reading a Linux guest's serial log: the checks several slow tiers share."""

from __future__ import annotations

import re

# ACPICA's own prefixes for a table or AML problem ("ACPI BIOS Error (bug): ...").
ACPI_COMPLAINT = re.compile(r"ACPI (BIOS )?(Error|Exception|Warning)")


def assert_acpi_tables_accepted(serial: str, cpus: int) -> None:
    """The kernel enabled ACPI, complained about none of our tables, and found its CPUs and the
    IOAPIC in the MADT."""
    assert "ACPI: Interpreter enabled" in serial
    complaints = [line for line in serial.splitlines() if ACPI_COMPLAINT.search(line)]
    assert not complaints, complaints
    assert re.search(rf"smp: Brought up 1 node, {cpus} CPUs?", serial)
    assert re.search(r"IOAPIC\[0\]: apic_id \d+, version \d+, address 0xfec00000, GSI 0-23", serial)
