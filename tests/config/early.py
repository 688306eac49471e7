"""Expected values for the early dialect's -drive/-netdev, which each give a backend and the
device that puts it into the next slot: build both halves the way the parser must."""

from __future__ import annotations

from pystratovirt.machine.vmconfig import BlockDeviceConfig, NetDeviceConfig
from pystratovirt.virtio.block_backend import DriveConfig
from pystratovirt.virtio.tap import NetdevConfig


def drive(id, path, read_only=False, direct=True, serial=None, iothread=None, iops=None):
    return (DriveConfig(id, path, read_only=read_only, direct=direct, iops=iops),
            BlockDeviceConfig(id, id, serial=serial, iothread=iothread))


def net(id, tap, mac=None, vhost=False, tap_fds=(), vhost_fds=(), iothread=None):
    return (NetdevConfig(id, ifname=tap, fds=tuple(str(f) for f in tap_fds), vhost=vhost,
                         vhostfds=tuple(str(f) for f in vhost_fds)),
            NetDeviceConfig(id, id, mac=mac, iothread=iothread))


def disks(*pairs) -> dict:
    """VmConfig keyword arguments for these early drives."""
    return {"drives": [p[0] for p in pairs], "block_devices": [p[1] for p in pairs]}


def nics(*pairs) -> dict:
    """VmConfig keyword arguments for these early NICs."""
    return {"netdevs": [p[0] for p in pairs], "net_devices": [p[1] for p in pairs]}


def drives_of(cfg) -> dict:
    return {"drives": cfg.drives, "block_devices": cfg.block_devices}


def nics_of(cfg) -> dict:
    return {"netdevs": cfg.netdevs, "net_devices": cfg.net_devices}


def console(id, socket_path) -> dict:
    """VmConfig keyword arguments for an early -chardev: a socket chardev and a console on it."""
    from pystratovirt.machine.vmconfig import ChardevConfig, ConsoleConfig
    return {"chardevs": [ChardevConfig(id, "socket", socket_path)], "consoles": [ConsoleConfig(id, id)]}


def consoles(*pairs) -> dict:
    merged = {"chardevs": [], "consoles": []}
    for id, path in pairs:
        one = console(id, path)
        merged["chardevs"] += one["chardevs"]
        merged["consoles"] += one["consoles"]
    return merged


def consoles_of(cfg) -> dict:
    return {"chardevs": cfg.chardevs, "consoles": cfg.consoles}
