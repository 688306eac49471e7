"""Tests of the Linux guest kit: kconfig fragment, init script, module
ordering, initramfs/rootfs contents, CLI -- and, marked slow, the real lean
kernel build and the stock kernel fetch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pystratovirt.guest import kernel, kit
from pystratovirt.guest.initramfs import read_newc

FRAGMENT_TEXT = kernel.FRAGMENT.read_text()

# What the lean kernel must have (the brief), and what it must not.
REQUIRED_ON = {
    "64BIT", "SMP", "PRINTK", "PRINTK_TIME", "TTY", "SERIAL_8250", "SERIAL_8250_CONSOLE",
    "BLK_DEV_INITRD", "RD_GZIP", "BINFMT_ELF", "BINFMT_SCRIPT", "DEVTMPFS", "DEVTMPFS_MOUNT",
    "PROC_FS", "SYSFS", "VIRTIO", "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES", "VIRTIO_BLK",
    "VIRTIO_NET", "VIRTIO_BALLOON", "BLOCK", "EXT4_FS", "NET", "INET", "IP_PNP", "PACKET", "UNIX",
    "NETDEVICES", "NET_CORE", "KVM_GUEST", "HYPERVISOR_GUEST", "PARAVIRT", "X86_MPPARSE",
    "VIRTIO_CONSOLE", "HW_RANDOM", "HW_RANDOM_VIRTIO",
}
FORCED_OFF = {
    "PCI", "MODULES", "FTRACE", "KPROBES", "PTP_1588_CLOCK_KVM", "RANDOMIZE_BASE",
    "SERIO_I8042", "ACPI",
}


# -- kconfig fragment --------------------------------------------------------
def test_fragment_lines_are_well_formed() -> None:
    for number, line in enumerate(FRAGMENT_TEXT.splitlines(), 1):
        ok = (
            line == ""
            or re.fullmatch(r"CONFIG_[A-Z0-9_]+=(y|[0-9]+|\"[^\"]*\")", line)
            or re.fullmatch(r"# CONFIG_[A-Z0-9_]+ is not set", line)
            or (line.startswith("#") and not line.startswith("# CONFIG_"))
        )
        assert ok, f"lean.config line {number}: {line!r}"
    assert FRAGMENT_TEXT.endswith("\n")


def test_fragment_has_required_and_forbidden_options() -> None:
    options = kernel.parse_fragment(FRAGMENT_TEXT)
    for name in REQUIRED_ON:
        assert options.get(f"CONFIG_{name}") == "y", f"CONFIG_{name} must be =y"
    for name in FORCED_OFF:
        assert f"CONFIG_{name}" in options and options[f"CONFIG_{name}"] is None, \
            f"CONFIG_{name} must be forced off"
    assert 2 <= int(options["CONFIG_NR_CPUS"]) <= 64


def test_parse_fragment_rejects_mistakes() -> None:
    with pytest.raises(kernel.KernelConfigError, match="line 1"):
        kernel.parse_fragment("CONFIG_FOO y\n")
    with pytest.raises(kernel.KernelConfigError, match="set twice"):
        kernel.parse_fragment("CONFIG_FOO=y\n# CONFIG_FOO is not set\n")
    with pytest.raises(kernel.KernelConfigError, match="is not set"):
        kernel.parse_fragment("CONFIG_FOO=n\n")
    with pytest.raises(kernel.KernelConfigError, match="line 2"):
        kernel.parse_fragment("# comment\n# CONFIG_FOO is not set.\n")
    assert kernel.parse_fragment("# just a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\n") == {
        "CONFIG_A": "y", "CONFIG_B": None}


def test_acpi_overlay_replaces_lean_settings() -> None:
    overlay = kernel.ACPI_OVERLAY.read_text()
    composed = kernel.overlay_fragment(FRAGMENT_TEXT, overlay)
    options = kernel.parse_fragment(composed)  # no option set twice
    assert options["CONFIG_ACPI"] == "y"
    assert options["CONFIG_X86_MPPARSE"] is None and options["CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"] is None
    base = kernel.parse_fragment(FRAGMENT_TEXT)
    assert {k: v for k, v in options.items() if k not in kernel.parse_fragment(overlay)} == \
        {k: v for k, v in base.items() if k not in kernel.parse_fragment(overlay)}
    assert kernel.build_key("6.1.192-2", composed) != kernel.build_key("6.1.192-2", FRAGMENT_TEXT)
    with pytest.raises(kernel.KernelConfigError):
        kernel.overlay_fragment(FRAGMENT_TEXT, "CONFIG_ACPI y\n")


def test_verify_config_names_each_wrong_option() -> None:
    fragment = kernel.parse_fragment(
        "CONFIG_A=y\nCONFIG_N=8\n# CONFIG_OFF is not set\n# CONFIG_GONE is not set\nCONFIG_MISSING=y\n"
        "CONFIG_WRONG=y\n")
    config = ("CONFIG_A=y\nCONFIG_N=8\nCONFIG_OFF=y\nCONFIG_WRONG=m\n# CONFIG_OTHER is not set\n")
    problems = kernel.verify_config(fragment, config)
    assert len(problems) == 3
    assert any("CONFIG_OFF should be off" in p for p in problems)
    assert any("CONFIG_MISSING should be CONFIG_MISSING=y but is not set" in p for p in problems)
    assert any("CONFIG_WRONG=m" in p for p in problems)
    assert kernel.verify_config(fragment, config.replace("CONFIG_OFF=y", "")
                                .replace("=m", "=y") + "CONFIG_MISSING=y\n") == []


def test_build_key_depends_on_inputs() -> None:
    key = kernel.build_key("6.1.192-2", FRAGMENT_TEXT)
    assert key == kernel.build_key("6.1.192-2", FRAGMENT_TEXT)
    assert key != kernel.build_key("6.1.193-1", FRAGMENT_TEXT)
    assert key != kernel.build_key("6.1.192-2", FRAGMENT_TEXT + "CONFIG_X=y\n")
    # Comments and layout do not matter; settings do.
    assert key == kernel.build_key("6.1.192-2", "# a new comment\n\n" + FRAGMENT_TEXT)
    assert key != kernel.build_key("6.1.192-2", FRAGMENT_TEXT.replace("CONFIG_NR_CPUS=8",
                                                                      "CONFIG_NR_CPUS=4"))


def test_cache_root_respects_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel.cache_root() == tmp_path / "xdg" / "pystratovirt"
    assert kernel.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert (tmp_path / "explicit").is_dir()


def test_bzimage_version_reads_the_setup_header(tmp_path: Path) -> None:
    image = bytearray(0x1000)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    image[0x400:0x420] = b"6.1.192 (pystratovirt) #1 SMP\0"
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(image))
    assert kernel.bzimage_version(path) == "6.1.192 (pystratovirt) #1 SMP"
    path.write_bytes(b"\0" * 0x1000)
    with pytest.raises(ValueError, match="not a bzImage"):
        kernel.bzimage_version(path)


# -- init script ---------------------------------------------------------------
@pytest.mark.parametrize("shell", ["sh", "busybox"])
def test_init_script_syntax(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    argv = [shell, "-n", str(kit.INIT_SCRIPT)] if shell == "sh" else \
        [shell, "sh", "-n", str(kit.INIT_SCRIPT)]
    subprocess.run(argv, check=True)


def test_init_script_contract() -> None:
    text = kit.INIT_SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert 'echo "PYSTRATOVIRT-READY uptime=$uptime"' in text
    assert "uname -r" in text and "/etc/modules-load" in text
    assert "pystratovirt.cmd=" in text and "poweroff -f" in text and "reboot -f" in text
    assert "setsid cttyhack sh" in text
    # Every command /init runs must be an applet we link.
    for applet in ("mount", "insmod", "cat", "uname", "setsid", "cttyhack", "sleep", "sync",
                   "poweroff", "reboot"):
        assert applet in kit.APPLETS


def _unpack(entries, dest: Path) -> None:
    """Materialise a parsed archive on the host (device nodes skipped)."""
    for e in entries:
        target = dest / e.name
        if e.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
        elif e.kind == "symlink":
            os.symlink(e.data.decode(), target)
        elif e.kind == "file":
            target.write_bytes(e.data)
            os.chmod(target, e.perm)


STUBS = {
    # /sbin comes before /bin in /init's PATH, so these shadow the applets.
    # (busybox sh runs some applets -- uname, insmod -- directly whatever
    # PATH says, so those cannot be stubbed and run for real below.)
    "mount": 'echo "STUB mount $*"',
    "sync": ":",
    "cat": 'if [ "$1" = /proc/cmdline ]; then echo "$FAKE_CMDLINE"; else exec /bin/busybox cat "$@"; fi',
    # End the run here: kill /init (our parent) instead of the machine.
    "poweroff": 'echo "STUB poweroff $*"; kill -9 $PPID',
    "reboot": 'echo "STUB reboot $*"; kill -9 $PPID',
}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("busybox") is None
                    or shutil.which("chroot") is None, reason="needs root (chroot) and busybox")
@pytest.mark.parametrize("action", ["poweroff", "reboot"])
def test_init_runs_in_a_chroot(tmp_path: Path, action: str) -> None:
    """Run the real /init from the real initramfs, with stubs for privileged commands."""
    cpio = kit.build_initramfs(Path(shutil.which("busybox")))
    root = tmp_path / "root"
    root.mkdir()
    _unpack(read_newc(cpio.getvalue()), root)
    # The listed modules do not exist, so the real insmod fails without ever
    # reaching the host kernel, and /init reports each failure in list order.
    (root / "lib" / "modules").mkdir(parents=True)
    (root / "etc" / "modules-load").write_text("virtio.ko\n# comment\n\nvirtio_mmio.ko foo=1\n")
    (root / "proc" / "uptime").write_text("12.34 5.67\n")
    for name, body in STUBS.items():
        (root / "sbin" / name).write_text(f"#!/bin/sh\n{body}\n")
        os.chmod(root / "sbin" / name, 0o755)
    env = {"FAKE_CMDLINE": f"console=ttyS0 reboot=k pystratovirt.cmd={action} *"}
    proc = subprocess.run([shutil.which("chroot"), str(root), "/bin/sh", "/init"], env=env,
                          timeout=30, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("insmod:")]
    assert lines == [
        "STUB mount -t proc proc /proc",
        "STUB mount -t sysfs sysfs /sys",
        "STUB mount -t devtmpfs devtmpfs /dev",
        "init: insmod virtio.ko failed",
        "init: insmod virtio_mmio.ko failed",
        "PYSTRATOVIRT-READY uptime=12.34",
        os.uname().release,  # the real `uname -r`, of the host kernel here
        f"PYSTRATOVIRT-{action.upper()}",
        f"STUB {action} -f",
    ], proc.stdout


# -- module ordering -----------------------------------------------------------
# One line of modules.dep per module (the backslash below only wraps the long one).
MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_balloon.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/some-thing.ko:
"""
MODULES_BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n"


def test_module_order_puts_dependencies_first() -> None:
    order, builtin = kit.module_load_order(MODULES_DEP, kit.STOCK_MODULES, MODULES_BUILTIN)
    names = [kit.module_name(p) for p in order]
    assert builtin == ["ext4"]
    assert len(names) == len(set(names)), "each module loaded once"
    assert set(names) == {"virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "failover",
                          "net_failover", "virtio_net", "virtio_balloon"}
    table = kit.parse_modules_dep(MODULES_DEP)
    for name in names:
        for dep in table[name][1]:
            assert names.index(kit.module_name(dep)) < names.index(name), f"{dep} before {name}"
    assert "kernel/drivers/net/virtio_net.ko.xz" in order


def test_module_names_normalise_dashes_and_suffixes() -> None:
    assert kit.module_name("kernel/fs/some-thing.ko") == "some_thing"
    assert kit.module_name("a/b/virtio_net.ko.zst") == "virtio_net"
    order, _ = kit.module_load_order(MODULES_DEP, ["some-thing"])
    assert order == ["kernel/fs/some-thing.ko"]


def test_module_order_errors() -> None:
    with pytest.raises(ValueError, match="neither"):
        kit.module_load_order(MODULES_DEP, ["nonexistent"])
    cyclic = "a.ko: b.ko\nb.ko: a.ko\n"
    with pytest.raises(ValueError, match="cycle"):
        kit.module_load_order(cyclic, ["a"])
    with pytest.raises(ValueError, match="does not list"):
        kit.module_load_order("a.ko: missing.ko\n", ["a"])


# -- initramfs contents ----------------------------------------------------------
def test_initramfs_contents(tmp_path: Path) -> None:
    fake_busybox = tmp_path / "busybox"
    fake_busybox.write_bytes(b"\x7fELF fake busybox")
    modules = {"virtio.ko": b"\x7fELF v", "virtio_mmio.ko": b"\x7fELF m"}
    entries = {e.name: e for e in read_newc(kit.build_initramfs(fake_busybox, modules).getvalue())}
    assert entries["init"].perm == 0o755 and entries["init"].data == kit.INIT_SCRIPT.read_bytes()
    assert entries["bin/busybox"].perm == 0o755 and entries["bin/busybox"].data.startswith(b"\x7fELF")
    for applet in kit.APPLETS:
        assert entries[f"bin/{applet}"].kind == "symlink" and entries[f"bin/{applet}"].data == b"busybox"
    console = entries["dev/console"]
    assert console.kind == "chr" and (console.rdevmajor, console.rdevminor) == (5, 1)
    for directory in ("proc", "sys", "dev", "tmp", "etc"):
        assert entries[directory].kind == "dir"
    assert entries["etc/modules-load"].data == b"virtio.ko\nvirtio_mmio.ko\n"
    assert entries["lib/modules/virtio_mmio.ko"].data == b"\x7fELF m"
    plain = {e.name for e in read_newc(kit.build_initramfs(fake_busybox).getvalue())}
    assert "etc/modules-load" not in plain and "lib/modules" not in plain


# -- rootfs ------------------------------------------------------------------------
def test_parse_size() -> None:
    assert kit.parse_size("64M") == 64 << 20
    assert kit.parse_size("1G") == 1 << 30
    assert kit.parse_size("512k") == 512 << 10
    assert kit.parse_size("4096") == 4096
    assert kit.parse_size(8192) == 8192
    with pytest.raises(ValueError):
        kit.parse_size("lots")


def _debugfs_cat(image: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout


@pytest.mark.skipif(shutil.which("busybox") is None
                    or shutil.which("debugfs", path="/sbin:/usr/sbin:/usr/bin:/bin") is None,
                    reason="needs busybox and e2fsprogs on the host")
def test_write_rootfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    image = kit.write_rootfs(tmp_path / "rootfs.ext4", "16M",
                             files={"/etc/extra.txt": "extra\n", "data/bin.dat": b"\x00\x01"},
                             busybox=Path(shutil.which("busybox")))
    assert image.stat().st_size == 16 << 20
    info = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    assert re.search(r"Filesystem volume name:\s+pystratovirt", info)
    assert re.search(r"Block size:\s+4096", info)
    known = kit.rootfs_known_files()
    for name, data in known.items():
        assert _debugfs_cat(image, f"/{name}") == data
    assert _debugfs_cat(image, "/etc/extra.txt") == b"extra\n"
    assert _debugfs_cat(image, "/data/bin.dat") == b"\x00\x01"
    assert _debugfs_cat(image, "/init") == kit.INIT_SCRIPT.read_bytes()
    listing = subprocess.run(["debugfs", "-R", "stat /sbin/init", str(image)], check=True,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    assert 'Fast link dest: "../init"' in listing
    sums = known["data/SHA256SUMS"].decode()
    assert "hello.txt" in sums and "pattern.bin" in sums and len(known["data/pattern.bin"]) == 1 << 20


# -- CLI ---------------------------------------------------------------------------
def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        kit.main(["--flavour", "lean"])  # -o is required
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        kit.main(["-o", "x", "--flavour", "tiny"])
    with pytest.raises(SystemExit) as exc:
        kit.main(["linux", "--help"])
    assert exc.value.code == 0
    assert "--rootfs-size" in capsys.readouterr().out


# -- real builds (slow) --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_lean_guest_build() -> None:
    guest = kit.ensure_lean_guest()
    assert guest.bzimage.is_file() and guest.vmlinux.is_file()
    assert guest.version.startswith("6.1"), guest.version
    assert kernel.bzimage_version(guest.bzimage) == guest.version
    assert guest.release.startswith("6.1.")
    assert guest.vmlinux.read_bytes()[:4] == b"\x7fELF"
    fragment = kernel.parse_fragment(FRAGMENT_TEXT)
    assert kernel.verify_config(fragment, guest.config.read_text()) == []
    entries = {e.name: e for e in read_newc(guest.initramfs.read_bytes())}
    assert "init" in entries and "bin/busybox" in entries and "dev/console" in entries
    assert read_newc(guest.initramfs_uncompressed.read_bytes()) == list(entries.values())
    assert "console=ttyS0" in guest.cmdline and "reboot=k" in guest.cmdline
    # Cached: the second call is instant and returns the same artifacts.
    assert kit.ensure_lean_guest() == guest


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_stock_guest_fetch() -> None:
    guest = kit.ensure_stock_guest()
    assert guest.vmlinuz.is_file() and guest.release.startswith("6.1.")
    assert guest.version.startswith(guest.release)
    entries = {e.name: e for e in read_newc(guest.initramfs.read_bytes())}
    load = entries["etc/modules-load"].data.decode().split()
    assert load == list(guest.modules)
    names = [m.removesuffix(".ko") for m in load]
    for wanted in ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_balloon"):
        assert wanted in names
    assert names.index("virtio_ring") < names.index("virtio_mmio")
    assert "ext4" in names or "ext4" in guest.builtin
    for module in load:
        assert entries[f"lib/modules/{module}"].data[:4] == b"\x7fELF"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cli_writes_the_documented_layout(tmp_path: Path) -> None:
    assert kit.main(["-o", str(tmp_path), "--flavour", "lean", "--rootfs-size", "32M"]) == 0
    for rel in ("lean/bzImage", "lean/vmlinux", "lean/config", "lean/cmdline", "lean/System.map",
                "initramfs.cpio.gz", "initramfs.cpio", "rootfs.ext4", "guest.json"):
        assert (tmp_path / rel).is_file(), rel
    assert (tmp_path / "rootfs.ext4").stat().st_size == 32 << 20
