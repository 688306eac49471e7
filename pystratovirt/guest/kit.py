"""The Linux guest kit: bootable Linux guests for pystratovirt, from Debian packages.

Owns the orchestration behind ``python -m pystratovirt.guest linux`` (see
:func:`main`) and the Python API the test suite uses:

* :func:`ensure_lean_guest` -- the "lean" micro-VM kernel compiled from
  ``linux-source-6.1`` with ``linux/lean.config`` (:mod:`.kernel`), plus the
  busybox initramfs;
* :func:`ensure_stock_guest` -- Debian's cloud kernel, unchanged, with its
  virtio modules (and their dependencies, from ``modules.dep``) in the
  initramfs, loaded by ``/init`` in dependency order;
* :func:`ensure_initramfs` -- the newc/gzip initramfs (:mod:`.initramfs`):
  static busybox, applet symlinks, ``/init`` (``linux/init``), console
  device nodes, optionally kernel modules and ``/etc/modules-load``;
* :func:`write_rootfs` -- an ext4 disk image (``mkfs.ext4 -d``) holding the
  same userland plus known files (:func:`rootfs_known_files`), bootable
  with ``root=/dev/vda``.

Everything built is cached below ``$XDG_CACHE_HOME/pystratovirt`` (default
``~/.cache/pystratovirt``); a second run is instant. The CLI copies the
artifacts into the output directory, laid out as::

    DIR/lean/bzImage            lean kernel (LZ4 payload)
    DIR/lean/vmlinux            its ELF image (symbols, for debugging)
    DIR/lean/System.map
    DIR/lean/config             its full .config
    DIR/lean/cmdline            recommended kernel command line
    DIR/initramfs.cpio.gz       busybox initramfs for the lean kernel
    DIR/initramfs.cpio          the same, uncompressed (no in-guest inflate)
    DIR/rootfs.ext4             ext4 root disk (root=/dev/vda)
    DIR/stock/vmlinuz           Debian cloud kernel, unchanged
    DIR/stock/config            its .config
    DIR/stock/initramfs.cpio.gz busybox initramfs + virtio modules
    DIR/stock/modules-load      module load order used by /init
    DIR/stock/cmdline           recommended kernel command line
    DIR/guest.json              versions, paths and command lines

(``lean/`` and the top-level images with ``--flavour lean``, the default;
``stock/`` with ``--flavour stock``; both with ``all``.)

Ready markers: the init prints ``PYSTRATOVIRT-READY uptime=<s>`` and then
``uname -r``; where guest system calls cannot run, the kernel's own
``Run /init as init process`` line is the last sign of life.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import debian, kernel
from .debian import log
from .initramfs import CpioWriter
from .kernel import LeanKernel, cache_root

INIT_SCRIPT = Path(__file__).with_name("linux") / "init"
BUSYBOX_PACKAGE = "busybox-static"
# Bump when the initramfs/rootfs layout changes, to invalidate cached images.
USERLAND_VERSION = 1

# Applets linked in /bin: what /init uses, plus enough to poke at devices,
# disks and the network from the shell. Kept short on purpose: every cpio
# entry is work for the (emulated) kernel at unpack time.
APPLETS = (
    # used by /init
    "sh", "mount", "insmod", "cat", "uname", "setsid", "cttyhack", "sleep", "sync",
    "poweroff", "reboot",
    # interactive use and tests
    "ash", "echo", "printf", "test", "[", "true", "false", "ls", "cp", "mv", "rm",
    "ln", "mkdir", "rmdir", "touch", "mknod", "umount", "df", "dd", "sed", "grep",
    "head", "tail", "wc", "cut", "tr", "od", "hexdump", "cmp", "md5sum", "sha256sum",
    "stat", "ps", "kill", "free", "dmesg", "halt", "lsmod", "rmmod", "ip",
    "ifconfig", "route", "ping", "nc", "udhcpc", "devmem",
)

# Console devices for PID 1 before devtmpfs is mounted: (path, kind, major, minor, mode).
DEVICE_NODES = (
    ("dev/console", "c", 5, 1, 0o600),
    ("dev/null", "c", 1, 3, 0o666),
    ("dev/ttyS0", "c", 4, 64, 0o600),
)

# Modules the stock kernel needs for the VMM's devices; ext4 is built into
# Debian's cloud kernel and is then reported as built-in.
STOCK_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_balloon", "ext4")

# Recommended command lines. console: the 16550 at 0x3f8. reboot=k: reset
# via the i8042 the VMM emulates (no driver needed). panic=1: a dead guest
# reboots -- i.e. exits the VMM -- rather than hanging. tsc=reliable: skip
# the clocksource watchdog and TSC sync checks, pure cost under emulation.
LEAN_CMDLINE = "console=ttyS0 reboot=k panic=1 tsc=reliable"
# Debian's kernel also probes a PCI bus and four legacy UARTs unless told
# not to. Note it has neither X86_MPPARSE nor VIRTIO_MMIO_CMDLINE_DEVICES:
# it finds extra CPUs, the IOAPIC and virtio-mmio devices only through ACPI.
STOCK_CMDLINE = "console=ttyS0 reboot=k panic=1 tsc=reliable pci=off 8250.nr_uarts=1"
# The lean kernel's ACPI variant has PCI built in (ACPICA needs it), but there is no PCI bus.
LEAN_ACPI_CMDLINE = f"{LEAN_CMDLINE} pci=off"


@dataclass(frozen=True)
class LeanGuest:
    """The lean kernel with its initramfs, all inside the cache."""

    bzimage: Path
    vmlinux: Path
    config: Path
    system_map: Path
    initramfs: Path  # gzip-compressed newc
    initramfs_uncompressed: Path
    version: str  # bzImage header version string, "6.1.192 (...) #1 SMP ..."
    release: str  # uname -r
    cmdline: str
    kernel: LeanKernel


@dataclass(frozen=True)
class StockGuest:
    """Debian's cloud kernel with a module-loading initramfs, inside the cache."""

    vmlinuz: Path
    config: Path
    system_map: Path  # a placeholder in Debian's package (real one: -dbg package)
    initramfs: Path
    modules: tuple[str, ...]  # archive file names in load order
    builtin: tuple[str, ...]  # requested modules that are built into the kernel
    package: str
    package_version: str
    release: str
    version: str
    cmdline: str


@dataclass(frozen=True)
class Initramfs:
    """A cached initramfs, gzip-compressed and raw."""

    gz: Path
    raw: Path


# -- userland ----------------------------------------------------------------
def ensure_busybox(cache_dir: Path | str | None = None) -> Path:
    """The static busybox binary from Debian's busybox-static package."""
    cache = cache_root(cache_dir)
    with kernel.cache_lock(cache, "debian"):
        _, tree = debian.fetch_package(BUSYBOX_PACKAGE, cache / "debian")
    binary = tree / "bin" / "busybox"
    if not binary.is_file():
        raise debian.DebianError(f"{BUSYBOX_PACKAGE} has no bin/busybox")
    return binary


def _userland_key(busybox: Path, extra: bytes = b"") -> str:
    digest = hashlib.sha256()
    for part in (str(USERLAND_VERSION).encode(), busybox.read_bytes(), INIT_SCRIPT.read_bytes(),
                 "\0".join(APPLETS).encode(), repr(DEVICE_NODES).encode(), extra):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def build_initramfs(busybox: Path, modules: Mapping[str, bytes] | None = None) -> CpioWriter:
    """The initramfs archive: busybox userland, /init and optional modules.

    ``modules`` maps archive file names (placed in /lib/modules) to module
    contents, in load order; /etc/modules-load lists them in that order.
    """
    cpio = CpioWriter()
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "etc", "mnt"):
        cpio.add_dir(directory)
    cpio.add_dir("tmp", 0o1777)
    cpio.add_dir("root", 0o700)
    for path, kind, major, minor, mode in DEVICE_NODES:
        cpio.add_device(path, kind, major, minor, mode)
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        cpio.add_symlink(f"bin/{applet}", "busybox")
    cpio.add_file("init", INIT_SCRIPT.read_bytes(), 0o755)
    if modules:
        cpio.add_dir("lib/modules")
        for name, data in modules.items():
            cpio.add_file(f"lib/modules/{name}", data, 0o644)
        cpio.add_file("etc/modules-load", "".join(f"{name}\n" for name in modules))
    return cpio


def ensure_initramfs(cache_dir: Path | str | None = None,
                     modules: Mapping[str, bytes] | None = None, name: str = "base") -> Initramfs:
    """Write (or reuse) the initramfs in the cache, gzip-compressed and raw."""
    cache = cache_root(cache_dir)
    busybox = ensure_busybox(cache)
    extra = b"".join(n.encode() + b"\0" + hashlib.sha256(d).digest() for n, d in (modules or {}).items())
    key = _userland_key(busybox, extra)
    directory = cache / "initramfs"
    directory.mkdir(exist_ok=True)
    gz = directory / f"{name}-{key}.cpio.gz"
    raw = directory / f"{name}-{key}.cpio"
    if not (gz.is_file() and raw.is_file()):
        cpio = build_initramfs(busybox, modules)
        cpio.write(raw, compress=False)
        cpio.write(gz)  # written last: its presence marks a complete pair
        log(f"initramfs written: {gz} ({gz.stat().st_size} bytes)")
    return Initramfs(gz=gz, raw=raw)


# -- lean --------------------------------------------------------------------
def ensure_lean_guest(cache_dir: Path | str | None = None, jobs: int | None = None,
                      acpi: bool = False) -> LeanGuest:
    """Build (first time, minutes) or reuse the lean kernel and its initramfs; with ``acpi``,
    the variant that finds the machine through ACPI only (linux/lean-acpi.config)."""
    built = kernel.ensure_lean_kernel(cache_dir, jobs=jobs,
                                      overlay_path=kernel.ACPI_OVERLAY if acpi else None)
    initrd = ensure_initramfs(cache_dir)
    return LeanGuest(
        bzimage=built.bzimage, vmlinux=built.vmlinux, config=built.config,
        system_map=built.system_map, initramfs=initrd.gz, initramfs_uncompressed=initrd.raw,
        version=built.version, release=built.release,
        cmdline=LEAN_ACPI_CMDLINE if acpi else LEAN_CMDLINE, kernel=built,
    )


# -- stock -------------------------------------------------------------------
_MODULE_SUFFIX = re.compile(r"\.ko(\.(gz|xz|zst))?$")


def module_name(path: str) -> str:
    """Kernel module name of a modules.dep path ('-' and '_' are the same to the kernel)."""
    base = path.rsplit("/", 1)[-1]
    return _MODULE_SUFFIX.sub("", base).replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {name: (path, [dependency paths])}."""
    result: dict[str, tuple[str, list[str]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise ValueError(f"modules.dep line {number} has no ':': {line!r}")
        result[module_name(path.strip())] = (path.strip(), deps.split())
    return result


def module_load_order(modules_dep: str, wanted: Iterable[str],
                      modules_builtin: str = "") -> tuple[list[str], list[str]]:
    """Module paths to insmod, every dependency before its users, and built-ins skipped.

    Returns (paths in load order, names of wanted modules that are built in).
    Unknown modules and dependency cycles raise ValueError.
    """
    table = parse_modules_dep(modules_dep)
    by_path = {path: name for name, (path, _) in table.items()}
    builtin = {module_name(line.strip()) for line in modules_builtin.splitlines() if line.strip()}
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"
    skipped: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError("module dependency cycle: " + " -> ".join(chain + (name,)))
        path, deps = table[name]
        state[name] = "visiting"
        for dep in deps:
            dep_name = by_path.get(dep, module_name(dep))
            if dep_name not in table:
                raise ValueError(f"{name} depends on {dep}, which modules.dep does not list")
            visit(dep_name, chain + (name,))
        state[name] = "done"
        order.append(path)

    for want in wanted:
        name = want.replace("-", "_")
        if name in table:
            visit(name, ())
        elif name in builtin:
            skipped.append(name)
        else:
            raise ValueError(f"module {want} is neither in modules.dep nor built in")
    return order, skipped


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes; busybox insmod cannot unpack compressed modules."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard  # a declared dependency; only needed here
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def ensure_stock_guest(cache_dir: Path | str | None = None,
                       package: str | None = None) -> StockGuest:
    """Fetch Debian's cloud kernel and build its module-loading initramfs."""
    cache = cache_root(cache_dir)
    package = package or debian.cloud_kernel_package()
    with kernel.cache_lock(cache, "debian"):
        version, tree = debian.fetch_package(package, cache / "debian")
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise debian.DebianError(f"{package}: expected one boot/vmlinuz-*, found {images}")
    release = images[0].name.removeprefix("vmlinuz-")
    moddir = tree / "lib" / "modules" / release
    if not moddir.is_dir():
        raise debian.DebianError(f"{package} has no lib/modules/{release}")
    if not (moddir / "modules.dep").is_file():
        # Debian generates modules.dep in the package's postinst, so the .deb
        # does not carry it: run depmod on the unpacked tree instead.
        depmod = shutil.which("depmod") or shutil.which("depmod", path="/sbin:/usr/sbin")
        if not depmod:
            raise FileNotFoundError("depmod not found: install kmod")
        log(f"generating modules.dep for {release} with depmod")
        subprocess.run([depmod, "-b", str(tree), release], check=True)
    builtin_list = moddir / "modules.builtin"
    paths, builtin = module_load_order(
        (moddir / "modules.dep").read_text(), STOCK_MODULES,
        builtin_list.read_text() if builtin_list.is_file() else "")
    modules: dict[str, bytes] = {}
    for rel in paths:
        name = _MODULE_SUFFIX.sub("", rel.rsplit("/", 1)[-1]) + ".ko"
        modules[name] = _read_module(moddir / rel)
    initrd = ensure_initramfs(cache, modules, name=f"stock-{release}")
    return StockGuest(
        vmlinuz=images[0], config=tree / "boot" / f"config-{release}",
        system_map=tree / "boot" / f"System.map-{release}", initramfs=initrd.gz,
        modules=tuple(modules), builtin=tuple(builtin), package=package,
        package_version=version, release=release, version=kernel.bzimage_version(images[0]),
        cmdline=STOCK_CMDLINE,
    )


# -- root disk ---------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """Bytes in "64M", "1G", "512K" or a plain number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"bad size {size!r}: use e.g. 64M, 1G or a number of bytes")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(match.group(1)) * scale


def rootfs_known_files() -> dict[str, bytes]:
    """Files every rootfs image carries, for the virtio-blk tests to check.

    ``data/SHA256SUMS`` lets the guest verify them itself with
    ``cd /data && sha256sum -c SHA256SUMS``.
    """
    hello = b"hello from the pystratovirt rootfs\n"
    # 1 MiB that is neither zeros nor periodic, so misplaced sectors show.
    pattern = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(1 << 15))
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                   for name, data in (("hello.txt", hello), ("pattern.bin", pattern)))
    return {
        "etc/pystratovirt-rootfs": b"PYSTRATOVIRT-ROOTFS ok\n",
        "data/hello.txt": hello,
        "data/pattern.bin": pattern,
        "data/SHA256SUMS": sums.encode(),
    }


def _mkfs_ext4() -> str:
    found = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
    if not found:
        raise FileNotFoundError("mkfs.ext4 not found: install e2fsprogs")
    return found


def write_rootfs(path: Path | str, size: str | int = "64M",
                 files: Mapping[str, bytes | str] | None = None,
                 cache_dir: Path | str | None = None, busybox: Path | None = None) -> Path:
    """Write an ext4 image at ``path``: busybox userland, /init, known files, ``files``.

    ``files`` maps guest paths (relative or absolute) to contents; they are
    added after, and may replace, :func:`rootfs_known_files`. The image
    boots with ``root=/dev/vda`` (no initramfs): the kernel runs
    /sbin/init, a link to the same /init as the initramfs. ``busybox``
    overrides the binary from Debian's busybox-static package.
    """
    path = Path(path)
    nbytes = parse_size(size)
    busybox = Path(busybox) if busybox else ensure_busybox(cache_dir)
    contents: dict[str, bytes] = dict(rootfs_known_files())
    for name, data in (files or {}).items():
        contents[name.lstrip("/")] = data.encode() if isinstance(data, str) else data
    with tempfile.TemporaryDirectory(prefix="pystratovirt-rootfs-") as tmp:
        root = Path(tmp) / "root"
        for directory in ("bin", "sbin", "dev", "proc", "sys", "etc", "mnt", "lib"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(mode=0o1777)
        os.chmod(root / "tmp", 0o1777)
        (root / "root").mkdir(mode=0o700)
        shutil.copyfile(busybox, root / "bin" / "busybox")
        os.chmod(root / "bin" / "busybox", 0o755)
        for applet in APPLETS:
            os.symlink("busybox", root / "bin" / applet)
        shutil.copyfile(INIT_SCRIPT, root / "init")
        os.chmod(root / "init", 0o755)
        os.symlink("../init", root / "sbin" / "init")
        for name, data in contents.items():
            target = root / name
            if not target.resolve().is_relative_to(root.resolve()):
                raise ValueError(f"rootfs file {name!r} escapes the image")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_image = path.with_name(f".{path.name}.tmp")
        with open(tmp_image, "wb") as image:
            image.truncate(nbytes)  # sparse: only written blocks take space
        # 4 KiB blocks even on small images; inode tables and journal fully
        # initialised here, so the guest kernel starts no lazy-init thread
        # that would write the disk in the background during tests.
        argv = [_mkfs_ext4(), "-q", "-F", "-b", "4096", "-L", "pystratovirt",
                "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                "-d", str(root), str(tmp_image)]
        proc = subprocess.run(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tmp_image.unlink(missing_ok=True)
            raise RuntimeError(f"mkfs.ext4 failed: {proc.stdout.strip()}")
        os.replace(tmp_image, path)
    return path


# -- CLI ---------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pystratovirt.guest linux",
        description="Build bootable Linux guests (kernel, initramfs, ext4 root disk) "
                    "from Debian packages.",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="output directory")
    parser.add_argument("--flavour", "--flavor", choices=("lean", "lean-acpi", "stock", "all"),
                        default="lean",
                        help="lean: micro-VM kernel built from linux-source-6.1 (default); "
                             "lean-acpi: the same, finding CPUs and devices through ACPI only; "
                             "stock: Debian's cloud kernel; all: every one")
    parser.add_argument("--jobs", "-j", type=int, default=None, help="make -j (default: all CPUs)")
    parser.add_argument("--rootfs-size", default="64M", help="size of rootfs.ext4 (default 64M)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache (default $XDG_CACHE_HOME/pystratovirt or ~/.cache/pystratovirt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m pystratovirt.guest linux -o DIR [--flavour ...]``; returns an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["linux"]:  # tolerate being handed the subcommand too
        argv = argv[1:]
    args = _parser().parse_args(argv)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {}
    written: list[Path] = []
    try:
        for flavour in ("lean", "lean-acpi"):
            if args.flavour not in (flavour, "all"):
                continue
            lean = ensure_lean_guest(args.cache_dir, jobs=args.jobs, acpi=flavour == "lean-acpi")
            for src, name in ((lean.bzimage, "bzImage"), (lean.vmlinux, "vmlinux"),
                              (lean.system_map, "System.map"), (lean.config, "config")):
                written.append(_copy(src, out / flavour / name))
            (out / flavour / "cmdline").write_text(lean.cmdline + "\n")
            written.append(out / flavour / "cmdline")
            manifest[flavour] = {
                "version": lean.version, "release": lean.release, "cmdline": lean.cmdline,
                "rootfs_cmdline": f"{lean.cmdline} root=/dev/vda rw",
                "build_seconds": lean.kernel.build_seconds, "cache": str(lean.bzimage.parent),
            }
        if args.flavour in ("lean", "lean-acpi", "all"):
            written.append(_copy(lean.initramfs, out / "initramfs.cpio.gz"))
            written.append(_copy(lean.initramfs_uncompressed, out / "initramfs.cpio"))
            log(f"writing rootfs.ext4 ({args.rootfs_size})")
            written.append(write_rootfs(out / "rootfs.ext4", args.rootfs_size, cache_dir=args.cache_dir))
        if args.flavour in ("stock", "all"):
            stock = ensure_stock_guest(args.cache_dir)
            # No System.map: Debian ships a placeholder (the real one is in -dbg).
            for src, name in ((stock.vmlinuz, "vmlinuz"), (stock.config, "config"),
                              (stock.initramfs, "initramfs.cpio.gz")):
                written.append(_copy(src, out / "stock" / name))
            (out / "stock" / "modules-load").write_text("".join(f"{m}\n" for m in stock.modules))
            (out / "stock" / "cmdline").write_text(stock.cmdline + "\n")
            written += [out / "stock" / "modules-load", out / "stock" / "cmdline"]
            manifest["stock"] = {
                "package": stock.package, "package_version": stock.package_version,
                "version": stock.version, "release": stock.release, "cmdline": stock.cmdline,
                "modules": list(stock.modules), "builtin": list(stock.builtin),
            }
    except (debian.DebianError, kernel.KernelConfigError, kernel.KernelBuildError,
            ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (out / "guest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    written.append(out / "guest.json")
    print(f"Linux guest kit output in {out}:")
    for path in written:
        print(f"  {path.relative_to(out)!s:28} {path.stat().st_size:>11,} bytes")
    for flavour, info in manifest.items():
        assert isinstance(info, dict)
        print(f"{flavour}: Linux {info['version']}")
        print(f"  boot: {info['cmdline']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
