"""Fixtures for the configuration tests: a scratch directory with a kernel, an initrd and disk images."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pystratovirt.config import parse_command_line


class Env:
    """A working directory (the test's cwd) holding ``vmlinux.bin``, ``initrd.img``, ``rootfs`` and ``disk1..7``."""

    def __init__(self, root: Path):
        self.root = root
        for name in ("vmlinux.bin", "initrd.img", "rootfs", *(f"disk{i}" for i in range(1, 8))):
            (root / name).write_bytes(b"\0" * 512)
        self.kernel = str(root / "vmlinux.bin")
        self.initrd = str(root / "initrd.img")
        self.rootfs = str(root / "rootfs")

    def path(self, name: str) -> str:
        return str(self.root / name)

    def parse(self, command: str | list[str]):
        """Parse a shell-like command line (or an argv list); return the Invocation."""
        argv = shlex.split(command) if isinstance(command, str) else command
        return parse_command_line(argv)

    def config(self, command: str | list[str] = ""):
        """Parse ``-kernel <kernel> <command>`` and return the VmConfig."""
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        inv = parse_command_line(["-kernel", self.kernel, *argv])
        assert inv.action == "run"
        return inv.config

    def write_json(self, doc, name: str = "vm.json") -> str:
        import json

        path = self.root / name
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return str(path)


@pytest.fixture
def env(tmp_path, monkeypatch) -> Env:
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path)
