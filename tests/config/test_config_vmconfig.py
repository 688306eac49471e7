"""The typed configuration itself: defaults, immutability, and its place in the layering."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pystratovirt.machine.vmconfig as vmconfig
from pystratovirt.machine.vmconfig import (
    BootSource,
    MachineConfig,
    VmConfig,
)
from pystratovirt.memory.layout import MEM_SIZE_MAX, MEM_SIZE_MIN, MiB
from pystratovirt.virtio.block_backend import DriveConfig
from pystratovirt.virtio.tap import NetdevConfig


def test_hand_built_config_has_stratovirt_defaults():
    cfg = VmConfig(boot=BootSource("/k"))
    assert cfg.machine == MachineConfig(vcpus=1, max_vcpus=1, mem_size=256 * MiB)
    assert cfg.drives == [] and cfg.netdevs == [] and cfg.consoles == [] and cfg.iothreads == []
    assert cfg.block_devices == [] and cfg.net_devices == []
    assert cfg.qmp_socket is None and cfg.extract_payload is True and cfg.name == "StratoVirt"


def test_max_vcpus_defaults_to_vcpus():
    assert MachineConfig(vcpus=3).max_vcpus == 3
    assert MachineConfig(vcpus=3, max_vcpus=8).max_vcpus == 8


def test_device_defaults():
    assert DriveConfig("d", "/f") == DriveConfig("d", "/f", read_only=False, direct=True, no_flush=False,
                                                 iops=None)
    assert NetdevConfig("n", "tap0").fds == () and NetdevConfig("n", "tap0").vhost is False


def test_frozen():
    with pytest.raises(AttributeError):
        BootSource("/k").kernel = "/x"  # type: ignore[misc]


def test_limits_agree_with_the_memory_layout():
    assert (vmconfig.MIN_MEM_SIZE, vmconfig.MAX_MEM_SIZE) == (MEM_SIZE_MIN, MEM_SIZE_MAX)
    assert vmconfig.MAX_VCPUS == 254


def test_imports_only_the_memory_map_the_backend_specs_and_the_slot_counts():
    """The machine's typed configuration stays below the machine: it names the memory map, the
    backend specs (virtio.block_backend, virtio.tap, devices.chardev) and the slot counts,
    nothing else."""
    tree = ast.parse(Path(vmconfig.__file__).read_text())
    ours = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative to pystratovirt.machine
                base = ["pystratovirt", "machine"][: 2 - (node.level - 1)]
                ours.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("pystratovirt"):
                ours.add(node.module)
        elif isinstance(node, ast.Import):
            ours |= {a.name for a in node.names if a.name.startswith("pystratovirt")}
    assert ours == {"pystratovirt.memory.layout", "pystratovirt.virtio.block_backend",
                    "pystratovirt.virtio.tap", "pystratovirt.devices.chardev", "pystratovirt.machine.slots"}
