"""Fixtures for the boot tests: guest memories of common sizes, a writer for kernel files, and a
payload cache of each test's own (never the user's)."""

from __future__ import annotations

import pytest

from pystratovirt.boot.payload_cache import ENV_DIR
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


@pytest.fixture(autouse=True)
def payload_cache_dir(tmp_path, monkeypatch):
    """load_kernel's default payload cache, private to the test."""
    path = tmp_path / "payload-cache"
    monkeypatch.setenv(ENV_DIR, str(path))
    return path
