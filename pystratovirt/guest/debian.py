"""Debian package access for the guest kit.

Owns everything that talks to apt/dpkg on the host: asking which version of
a package apt would fetch, downloading a package's .deb into a cache
directory with ``apt-get download`` (no installation, no root needed for the
download itself), unpacking it with ``dpkg-deb -x``, installing a host
package the kit needs (``linux-source-6.1``), and finding the current name
of Debian's cloud kernel package.

Only the Debian archive configured on the host is used; nothing here talks
to any other registry.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class DebianError(RuntimeError):
    """An apt/dpkg operation failed; the message says which and why."""


def log(message: str) -> None:
    """Progress output of the kit goes to stderr, so stdout stays parseable."""
    print(f"[guest-kit] {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], *, cwd: Path | None = None, capture: bool = True) -> str:
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            check=False,
            text=True,
            # Uncaptured output (apt's own progress) goes to file descriptor 2
            # directly: sys.stderr may be a Python object without a file
            # descriptor (e.g. under pytest's capsys).
            stdout=subprocess.PIPE if capture else 2,
            stderr=subprocess.PIPE if capture else 2,
            # A stable locale keeps apt's output parseable.
            env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"},
        )
    except FileNotFoundError as exc:
        raise DebianError(f"{argv[0]} not found: this kit needs a Debian host with apt") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip() if capture else ""
        raise DebianError(f"`{' '.join(argv)}` failed with status {proc.returncode}: {detail}")
    return proc.stdout if capture else ""


def candidate_version(package: str) -> str:
    """The version apt would download for ``package`` (its candidate)."""
    out = _run(["apt-cache", "policy", package])
    match = re.search(r"^\s*Candidate:\s*(\S+)", out, re.MULTILINE)
    if not match or match.group(1) == "(none)":
        raise DebianError(f"apt knows no installable version of {package}; run `apt-get update`?")
    return match.group(1)


def installed_version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        out = _run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", package])
    except DebianError:
        return None
    status, _, version = out.partition(" ")
    # "ii " = wanted install, currently installed; anything else is not usable.
    return version.strip() if status.startswith("ii") and version.strip() else None


def ensure_installed(package: str) -> str:
    """Install ``package`` on the host via apt-get when missing; return its version."""
    version = installed_version(package)
    if version is not None:
        return version
    log(f"installing {package} with apt-get (needed on the host)")
    _run(["apt-get", "install", "-y", "--no-install-recommends", package], capture=False)
    version = installed_version(package)
    if version is None:
        raise DebianError(f"{package} is still not installed after apt-get install")
    return version


def deb_filename(package: str, version: str, arch: str) -> str:
    """File name ``apt-get download`` gives a package (':' of the epoch is URL-quoted)."""
    return f"{package}_{version.replace(':', '%3a')}_{arch}.deb"


def download(package: str, cache_dir: Path, version: str | None = None) -> Path:
    """Download ``package`` (candidate version unless given) into ``cache_dir``.

    Reuses a .deb already in the cache. apt-get prints its own progress.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    version = version or candidate_version(package)
    quoted = version.replace(":", "%3a")
    existing = sorted(cache_dir.glob(f"{package}_{quoted}_*.deb"))
    if existing:
        return existing[0]
    log(f"downloading {package} {version}")
    # Download into a private directory first: an interrupted download then
    # never leaves a truncated .deb that a later run would trust.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        # Running as root, apt would try to drop to the _apt user, who cannot
        # write into a private temporary directory.
        _run(
            ["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
            cwd=Path(tmp),
            capture=False,
        )
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise DebianError(f"apt-get download {package} produced {len(debs)} files, expected 1")
        target = cache_dir / debs[0].name
        os.replace(debs[0], target)
    return target


def extract(deb: Path, dest: Path) -> Path:
    """Unpack the data of ``deb`` into ``dest`` with ``dpkg-deb -x``; reuse if present.

    The tree is unpacked beside ``dest`` and renamed into place, so ``dest``
    existing means a complete extraction.
    """
    dest = Path(dest)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        log(f"extracting {Path(deb).name}")
        _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def fetch_package(package: str, cache_dir: Path, version: str | None = None) -> tuple[str, Path]:
    """Download and unpack ``package``; return (version, extracted tree).

    Layout: ``cache_dir/debs/*.deb`` and ``cache_dir/pkg/<package>_<version>/``.
    """
    cache_dir = Path(cache_dir)
    version = version or candidate_version(package)
    deb = download(package, cache_dir / "debs", version)
    tree = extract(deb, cache_dir / "pkg" / f"{package}_{version.replace(':', '_')}")
    return version, tree


def cloud_kernel_package(meta: str = "linux-image-cloud-amd64") -> str:
    """Name of the unsigned image package Debian's cloud meta-package points at.

    ``linux-image-cloud-amd64`` depends on the signed ``linux-image-<abi>-
    cloud-amd64``; its ``-unsigned`` twin has the same kernel without the
    shim signature, which is all a VMM needs.
    """
    out = _run(["apt-cache", "depends", meta])
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if match:
            signed = match.group(1)
            return signed if signed.endswith("-unsigned") else f"{signed}-unsigned"
    raise DebianError(f"could not find the kernel image {meta} depends on:\n{out}")
