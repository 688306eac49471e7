"""The typed configuration itself: defaults, immutability, and its place in the layering."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pystratovirt.machine.vmconfig as vmconfig
from pystratovirt.machine.vmconfig import (
    BootSource, DriveConfig, MachineConfig, NetConfig, VmConfig,
)
from pystratovirt.memory.layout import MEM_SIZE_MAX, MEM_SIZE_MIN, MiB


def test_hand_built_config_has_stratovirt_defaults():
    cfg = VmConfig(boot=BootSource("/k"))
    assert cfg.machine == MachineConfig(vcpus=1, max_vcpus=1, mem_size=256 * MiB)
    assert cfg.drives == [] and cfg.nets == [] and cfg.consoles == [] and cfg.iothreads == []
    assert cfg.qmp_socket is None and cfg.extract_payload is True and cfg.name == "StratoVirt"


def test_max_vcpus_defaults_to_vcpus():
    assert MachineConfig(vcpus=3).max_vcpus == 3
    assert MachineConfig(vcpus=3, max_vcpus=8).max_vcpus == 8


def test_device_defaults():
    assert DriveConfig("d", "/f") == DriveConfig("d", "/f", read_only=False, direct=True, serial=None, iothread=None,
                                                 iops=None)
    assert NetConfig("n", "tap0").tap_fds == [] and NetConfig("n", "tap0").vhost is False


def test_frozen():
    with pytest.raises(AttributeError):
        BootSource("/k").kernel = "/x"  # type: ignore[misc]


def test_limits_agree_with_the_memory_layout():
    assert (vmconfig.MIN_MEM_SIZE, vmconfig.MAX_MEM_SIZE) == (MEM_SIZE_MIN, MEM_SIZE_MAX)
    assert vmconfig.MAX_VCPUS == 254


def test_imports_nothing_above_memory():
    tree = ast.parse(Path(vmconfig.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    ours = {m for m in imported if m and m.startswith("pystratovirt")}
    assert ours <= {"pystratovirt.memory.layout", "pystratovirt.memory"}
