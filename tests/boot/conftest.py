"""Fixtures for the boot tests: guest memories of common sizes and a writer for kernel files."""

from __future__ import annotations

import pytest

from pystratovirt.memory import GuestMemory
from pystratovirt.memory.layout import MiB


@pytest.fixture
def mem():
    m = GuestMemory(256 * MiB)
    yield m
    m.close()


@pytest.fixture
def write_file(tmp_path):
    counter = iter(range(1_000_000))

    def write(data: bytes, name: str | None = None):
        path = tmp_path / (name or f"file{next(counter)}")
        path.write_bytes(data)
        return path

    return write
