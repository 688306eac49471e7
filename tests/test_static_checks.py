"""The code's shape, checked with the tests: ``ruff check`` (the rules in pyproject.toml) over the
package, the tests and the benchmarks, and ``mypy`` over the package (strict in the layers
pyproject.toml lists, mypy's defaults elsewhere).

Both run as subprocesses of this interpreter (``python -m ruff``, ``python -m mypy``), so they are
the versions the test extra installed, from the repository root, so they read its pyproject.toml.
A failure shows the tool's own report. Without the tool (an install without the test extra) the
check is skipped and says so.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds; both take a few seconds here (mypy's cache is .mypy_cache in ROOT)


def run_tool(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]' installs it)")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_ruff_check_is_clean() -> None:
    proc = run_tool("ruff", "check", "--output-format", "concise", "pystratovirt", "tests", "bench")
    assert proc.returncode == 0, report(proc)
    assert "All checks passed" in proc.stdout, report(proc)


def test_mypy_is_clean() -> None:
    # No paths: pyproject.toml's [tool.mypy] says what is checked and how strictly.
    proc = run_tool("mypy")
    assert proc.returncode == 0, report(proc)
    assert proc.stdout.startswith("Success: no issues found"), report(proc)


def test_mypy_is_strict_exactly_in_the_strict_layers(tmp_path: Path) -> None:
    """The configuration the check above relies on: the same untyped function is an error in a
    module of a strict layer (virtio) and passes in a lenient one (boot)."""
    for module in ("virtio", "boot"):
        package = tmp_path / "pystratovirt" / module
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "untyped.py").write_text("def untyped(x):\n    return x\n")
    (tmp_path / "pystratovirt" / "__init__.py").write_text("")
    proc = run_tool("mypy", "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental",
                    "--cache-dir", str(tmp_path / "cache"), str(tmp_path / "pystratovirt"), cwd=tmp_path)
    assert proc.returncode == 1, report(proc)
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, report(proc)
    assert "pystratovirt/virtio/untyped.py" in errors[0] and "[no-untyped-def]" in errors[0], report(proc)
