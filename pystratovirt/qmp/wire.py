"""What a QMP client sees of each dialect on the wire: the seed's 0.x and StratoVirt 2.x.

The dialect itself (:class:`~pystratovirt.machine.vmconfig.Dialect`) is chosen by the command
line; on the wire it is the QEMU version the greeting and ``query-version`` announce, and the
line end after every message. Commands, replies and events are the same in both. The server is
given one :class:`Wire` at construction and keeps it.

* **0.x** (the default): exactly the seed's bytes, ``{"QMP":{"version":{"qemu":{"micro":1,
  "minor":0,"major":4},"package":""},"capabilities":[]}}`` and ``\\n``.
* **2.x**: what StratoVirt 2.3.0 sends, ``{"qemu":{"micro":1,"minor":0,"major":5},
  "package":"StratoVirt-2.3.0"}`` and ``\\r\\n`` (StratoVirt added the ``\\r`` for libvirt). Kata's
  govmm refuses a major below 5; Kuasar's decoder needs ``package`` to be a string. We announce
  StratoVirt's own package string because that is the version whose behaviour we follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..machine.requests import VersionInfo
from ..machine.vmconfig import Dialect


@dataclass(frozen=True)
class Wire:
    """The version a server announces and the line end it writes."""

    name: str
    version: VersionInfo
    line_end: bytes


#: The seed's dialect: StratoVirt 0.x's ``create_greeting(1, 0, 4)``, lines end in ``\n``.
WIRE_0X = Wire("0.x", VersionInfo(major=4, minor=0, micro=1, package=""), b"\n")
#: StratoVirt 2.3.0's dialect: major 5, its package string, lines end in ``\r\n``.
WIRE_2X = Wire("2.x", VersionInfo(major=5, minor=0, micro=1, package="StratoVirt-2.3.0"), b"\r\n")

_WIRES = {Dialect.V0: WIRE_0X, Dialect.V2: WIRE_2X}


def wire_of(dialect: Dialect) -> Wire:
    """How a VM started in ``dialect`` speaks QMP."""
    return _WIRES[dialect]
