"""The "lean" micro-VM Linux kernel: configure, build and cache it.

Owns turning Debian's ``linux-source-6.1`` tarball plus the kconfig fragment
``pystratovirt/guest/linux/lean.config`` into a ``bzImage`` (and the
matching ``vmlinux``, ``System.map`` and ``.config``):

1. the tarball is unpacked once into the cache (multi-GB trees never land
   in the repository);
2. ``scripts/kconfig/merge_config.sh -n`` runs ``make allnoconfig`` with the
   fragment as forced values, in an out-of-tree build directory;
3. every line of the fragment is checked against the resulting ``.config``
   (:func:`verify_config`): an option Kconfig dropped, e.g. for an unmet
   dependency, fails the build naming that option;
4. ``make -j N bzImage`` with a progress line; the log is kept.

Cache layout, below :func:`cache_root` (``$XDG_CACHE_HOME/pystratovirt`` or
``~/.cache/pystratovirt``)::

    src/linux-source-<pkgversion>/     unpacked kernel source (read-only use)
    build/lean-<pkgversion>/           kbuild output dir, reused incrementally
    build/lean-acpi-<pkgversion>/      the same for the ACPI variant
    lean-<key>/                        finished artifacts, one per key:
        bzImage vmlinux System.map config build.log kernel.json

The ACPI variant (``linux/lean-acpi.config``) is an overlay: its settings
replace or extend lean.config's (:func:`overlay_fragment`). It finds CPUs,
the IOAPIC and the virtio-mmio devices through the VMM's ACPI tables only,
as Debian's kernel does.

``<key>`` hashes the source package version, the fragment text and
:data:`RECIPE_VERSION`, so a second run with the same inputs is instant and
any change to the fragment gives a fresh build. ``kernel.json`` is written
last and marks a complete entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import debian
from .debian import log

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = Path(__file__).with_name("linux") / "lean.config"
ACPI_OVERLAY = Path(__file__).with_name("linux") / "lean-acpi.config"
# Bump whenever the build steps change what ends up in the artifacts.
RECIPE_VERSION = 1

_ASSIGN = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.+)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


class KernelConfigError(RuntimeError):
    """The fragment is malformed or did not survive Kconfig as written."""


class KernelBuildError(RuntimeError):
    """make failed; the message points at the build log."""


@dataclass(frozen=True)
class LeanKernel:
    """A built lean kernel in the cache."""

    bzimage: Path
    vmlinux: Path
    system_map: Path
    config: Path
    build_log: Path
    version: str  # kernel version string from the bzImage header
    release: str  # `uname -r` of the guest, e.g. "6.1.192"
    source_version: str  # Debian version of linux-source-6.1
    build_seconds: float  # wall time of the build that produced it
    key: str


# -- cache -------------------------------------------------------------------
def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The kit's cache directory (created): explicit, else XDG, else ~/.cache."""
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache_dir = Path(base) / "pystratovirt"
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def cache_lock(cache: Path, name: str) -> Iterator[None]:
    """Serialise builders sharing the cache (parallel test runs, two CLIs)."""
    lock_path = cache / f".{name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_key(source_version: str, fragment_text: str) -> str:
    """Cache key of a lean build: recipe, source version and the fragment's settings.

    The settings are hashed in canonical form, so editing a comment in the
    fragment does not cost a rebuild.
    """
    settings = parse_fragment(fragment_text)
    canonical = "\n".join(f"{name}={value}" for name, value in sorted(settings.items()))
    digest = hashlib.sha256()
    for part in (f"recipe={RECIPE_VERSION}", f"source={source_version}", canonical):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# -- kconfig fragment --------------------------------------------------------
def parse_fragment(text: str) -> dict[str, str | None]:
    """Options of a kconfig fragment: name -> value, None for "is not set".

    Only ``CONFIG_X=value``, ``# CONFIG_X is not set``, comments and blank
    lines are allowed; a repeated option is an error, since Kconfig would
    silently take the last one.
    """
    options: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        value: str | None
        if match := _ASSIGN.match(line):
            name, value = match.group(1), match.group(2)
        elif match := _UNSET.match(line):
            name, value = match.group(1), None
        elif not line or (line.startswith("#") and not line.startswith("# CONFIG_")):
            continue  # blank or comment; "# CONFIG_..." must be a well-formed unset
        else:
            raise KernelConfigError(f"fragment line {number} is not a kconfig setting: {raw!r}")
        if name in options:
            raise KernelConfigError(f"fragment line {number}: {name} is set twice")
        if value == "n":
            raise KernelConfigError(
                f"fragment line {number}: write '# {name} is not set' rather than {name}=n")
        options[name] = value
    return options


def overlay_fragment(base_text: str, overlay_text: str) -> str:
    """``base_text`` with ``overlay_text``'s settings applied: base lines naming an option the
    overlay sets are dropped, the overlay's lines follow. Both must be well-formed fragments."""
    parse_fragment(base_text)
    overridden = parse_fragment(overlay_text)
    kept = []
    for raw in base_text.splitlines():
        line = raw.strip()
        match = _ASSIGN.match(line) or _UNSET.match(line)
        if not (match and match.group(1) in overridden):
            kept.append(raw)
    return "\n".join(kept) + "\n\n# --- overlay ---\n" + overlay_text


def parse_config(text: str) -> dict[str, str | None]:
    """Settings of a generated .config (same representation as the fragment)."""
    result: dict[str, str | None] = {}
    for line in text.splitlines():
        if match := _ASSIGN.match(line):
            result[match.group(1)] = match.group(2)
        elif match := _UNSET.match(line):
            result[match.group(1)] = None
    return result


def verify_config(fragment: dict[str, str | None], config_text: str) -> list[str]:
    """Options of ``fragment`` that the final .config does not honour.

    An option requested off is satisfied when it is "not set" or absent (Kconfig
    omits symbols whose dependencies are unmet); one requested on must be
    present with exactly the requested value.
    """
    actual = parse_config(config_text)
    problems = []
    for name, wanted in fragment.items():
        got = actual.get(name)
        if wanted is None:
            if got is not None:
                problems.append(f"{name} should be off but is {name}={got}")
        elif got != wanted:
            shown = "not set" if got is None else f"{name}={got}"
            problems.append(f"{name} should be {name}={wanted} but is {shown}")
    return problems


# -- source ------------------------------------------------------------------
def ensure_source(cache: Path) -> tuple[str, Path]:
    """Install linux-source-6.1 if missing and unpack it into the cache."""
    version = debian.ensure_installed(SOURCE_PACKAGE)
    if not SOURCE_TARBALL.is_file():
        raise KernelBuildError(f"{SOURCE_PACKAGE} {version} is installed but {SOURCE_TARBALL} is missing")
    tree = cache / "src" / f"linux-source-{version}"
    if (tree / "Makefile").is_file():
        return version, tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    log(f"unpacking {SOURCE_TARBALL} ({version}) into {tree} (about a minute)")
    tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".unpack-"))
    try:
        # tar(1) is much faster than tarfile for xz and keeps the modes.
        subprocess.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tmp)], check=True)
        tops = list(tmp.iterdir())
        if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
            raise KernelBuildError(f"unexpected layout of {SOURCE_TARBALL}: {tops}")
        os.rename(tops[0], tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version, tree


# -- building ----------------------------------------------------------------
def _kbuild_env() -> dict[str, str]:
    env = dict(os.environ, LC_ALL="C")
    # A neutral banner instead of the builder's user@host.
    env.update(KBUILD_BUILD_USER="pystratovirt", KBUILD_BUILD_HOST="pystratovirt")
    # Variables from a caller's kernel work would redirect or alter the build.
    for var in ("ARCH", "CROSS_COMPILE", "KCONFIG_CONFIG", "KBUILD_OUTPUT", "O", "LOCALVERSION"):
        env.pop(var, None)
    return env


def configure(tree: Path, build_dir: Path, fragment_path: Path) -> str:
    """allnoconfig + fragment into ``build_dir``; verify; return the .config text."""
    build_dir.mkdir(parents=True, exist_ok=True)
    fragment_text = fragment_path.read_text()
    fragment = parse_fragment(fragment_text)
    log("configuring: make allnoconfig + merge_config.sh lean.config")
    # -n: `make allnoconfig` with the fragment as KCONFIG_ALLCONFIG, so every
    # option the fragment does not name is off (or at its hidden default).
    proc = subprocess.run(
        ["scripts/kconfig/merge_config.sh", "-n", "-O", str(build_dir), str(fragment_path.resolve())],
        cwd=tree, env=_kbuild_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    (build_dir / "merge_config.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise KernelConfigError(f"merge_config.sh failed:\n{proc.stdout[-4000:]}")
    config_text = (build_dir / ".config").read_text()
    problems = verify_config(fragment, config_text)
    if problems:
        raise KernelConfigError(
            "the kernel configuration does not honour lean.config "
            "(missing dependency or misspelt option?):\n  " + "\n  ".join(problems))
    return config_text


def _make(tree: Path, build_dir: Path, jobs: int, targets: list[str], log_path: Path,
          expected_steps: int | None) -> None:
    """Run make, teeing into ``log_path`` and showing progress on stderr."""
    argv = ["make", f"O={build_dir}", f"-j{jobs}", *targets]
    interactive = sys.stderr.isatty()
    start = last_report = time.monotonic()
    steps = 0
    last_step = ""
    with open(log_path, "w") as logf:
        logf.write(f"$ cd {tree} && {' '.join(argv)}\n")
        logf.flush()
        proc = subprocess.Popen(argv, cwd=tree, env=_kbuild_env(), text=True, errors="replace",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            # kbuild's quiet lines look like "  CC      fs/ext4/inode.o".
            if re.match(r"^  [A-Z][A-Z0-9_-]* +\S", line):
                steps += 1
                last_step = " ".join(line.split())
            now = time.monotonic()
            if now - last_report >= (1.0 if interactive else 30.0):
                last_report = now
                done = f"{steps} steps"
                if expected_steps:
                    done += f" (~{min(99, 100 * steps // expected_steps)}%)"
                elapsed = int(now - start)
                message = f"[guest-kit] building lean kernel: {elapsed // 60}m{elapsed % 60:02d}s {done}, {last_step}"
                if interactive:
                    print(f"\r\x1b[K{message[:150]}", end="", file=sys.stderr, flush=True)
                else:
                    print(message, file=sys.stderr, flush=True)
        status = proc.wait()
    if interactive:
        print(file=sys.stderr)
    if status != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise KernelBuildError(f"`make {' '.join(targets)}` failed (status {status}); see {log_path}:\n{tail}")
    (build_dir / ".pystratovirt-steps").write_text(str(steps))


def bzimage_version(path: Path) -> str:
    """The kernel version string in a bzImage's setup header (what file(1) shows).

    The x86 boot protocol keeps a pointer to it at 0x20E, relative to 0x200,
    when the header ("HdrS" at 0x202) is version 2.00 or newer.
    """
    data = Path(path).read_bytes()[:0x10000]
    if len(data) < 0x210 or data[0x1FE:0x200] != b"\x55\xaa" or data[0x202:0x206] != b"HdrS":
        raise ValueError(f"{path} is not a bzImage (no x86 boot setup header)")
    offset = int.from_bytes(data[0x20E:0x210], "little")
    if offset == 0:
        raise ValueError(f"{path} carries no kernel version string")
    start = 0x200 + offset
    end = data.index(b"\0", start)
    return data[start:end].decode(errors="replace")


def ensure_lean_kernel(cache_dir: Path | str | None = None, jobs: int | None = None,
                       fragment_path: Path = FRAGMENT, force: bool = False,
                       overlay_path: Path | None = None) -> LeanKernel:
    """Build the lean kernel (with ``overlay_path``'s settings on top, if given), or return the
    cached build for the same inputs."""
    cache = cache_root(cache_dir)
    fragment_path = Path(fragment_path)
    fragment_text = fragment_path.read_text()
    variant = "lean"
    if overlay_path is not None:
        overlay_path = Path(overlay_path)
        fragment_text = overlay_fragment(fragment_text, overlay_path.read_text())
        variant = overlay_path.stem
    parse_fragment(fragment_text)  # fail on a malformed fragment before any work
    with cache_lock(cache, "lean"):
        source_version = debian.ensure_installed(SOURCE_PACKAGE)
        key = build_key(source_version, fragment_text)
        out = cache / f"lean-{key}"
        if not force and (out / "kernel.json").is_file():
            return _load(out)
        # Only now the (large) source tree is needed; it may have been pruned.
        source_version, tree = ensure_source(cache)
        build_dir = cache / "build" / f"{variant}-{source_version}"
        start = time.monotonic()
        build_dir.mkdir(parents=True, exist_ok=True)
        if overlay_path is not None:
            fragment_path = build_dir / f"{variant}.fragment.config"
            fragment_path.write_text(fragment_text)
        configure(tree, build_dir, fragment_path)
        steps_file = build_dir / ".pystratovirt-steps"
        expected = int(steps_file.read_text()) if steps_file.is_file() else None
        jobs = jobs or os.cpu_count() or 1
        log(f"building bzImage with make -j{jobs} (a few minutes; log: {build_dir / 'build.log'})")
        _make(tree, build_dir, jobs, ["bzImage"], build_dir / "build.log", expected)
        release = subprocess.run(
            ["make", "-s", f"O={build_dir}", "kernelrelease"], cwd=tree, env=_kbuild_env(),
            check=True, text=True, stdout=subprocess.PIPE,
        ).stdout.strip()
        seconds = time.monotonic() - start
        # Assemble beside the final name and rename: a half-copied entry is never seen.
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".lean-{key}-"))
        try:
            shutil.copy2(build_dir / "arch/x86/boot/bzImage", tmp / "bzImage")
            shutil.copy2(build_dir / "vmlinux", tmp / "vmlinux")
            shutil.copy2(build_dir / "System.map", tmp / "System.map")
            shutil.copy2(build_dir / ".config", tmp / "config")
            shutil.copy2(build_dir / "build.log", tmp / "build.log")
            meta = {
                "version": bzimage_version(tmp / "bzImage"),
                "release": release,
                "source_version": source_version,
                "build_seconds": round(seconds, 1),
                # An incremental build reused objects of an earlier configuration.
                "incremental": expected is not None,
                "jobs": jobs,
                "key": key,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the kernel from other users
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"{variant} kernel {release} built in {seconds / 60:.1f} min: {out}")
        return _load(out)


def _load(out: Path) -> LeanKernel:
    meta = json.loads((out / "kernel.json").read_text())
    return LeanKernel(
        bzimage=out / "bzImage", vmlinux=out / "vmlinux", system_map=out / "System.map",
        config=out / "config", build_log=out / "build.log", version=meta["version"],
        release=meta["release"], source_version=meta["source_version"],
        build_seconds=meta["build_seconds"], key=meta["key"],
    )
