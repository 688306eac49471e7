"""Port bus routing and the i8042 reset / port 0x61 behaviour."""

import pytest

from pystratovirt.devices.bus import Bus, BusError
from pystratovirt.devices.i8042 import I8042


class Reg:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return offset + 0x10

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_routing_and_unclaimed_ports():
    bus = Bus("pio")
    dev = Reg()
    bus.insert(0x3F8, 8, dev)
    assert bus.read(0x3FA, 1) == 0x12
    bus.write(0x3FF, 1, 7)
    assert dev.writes == [(7, 1, 7)]
    assert bus.read(0x2F8, 1) == 0xFF
    assert bus.read(0x400, 2) == 0xFFFF
    assert bus.read(0x3FF, 2) == 0xFFFF  # straddles the end of the range
    bus.write(0x80, 1, 0)  # ignored


def test_overlap_refused():
    bus = Bus("pio")
    bus.insert(0x60, 5, Reg())
    with pytest.raises(BusError):
        bus.insert(0x64, 1, Reg())
    with pytest.raises(BusError):
        bus.insert(0x5F, 2, Reg())
    bus.insert(0x65, 1, Reg())


def test_i8042_reset_and_port_61():
    resets = []
    dev = I8042(lambda: resets.append(1))
    bus = Bus("pio")
    bus.insert(I8042.BASE, I8042.LENGTH, dev)
    assert bus.read(0x61, 1) == 0x20
    assert bus.read(0x64, 1) & 0x02 == 0  # input buffer empty: Linux's reboot=k waits for it
    bus.write(0x64, 1, 0xAA)
    assert resets == []
    bus.write(0x64, 1, 0xFE)
    assert resets == [1]
