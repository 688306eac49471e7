"""Boot the probe guest under real KVM through the ``stratovirt`` command and check what it sees.

These are the fast integration tests of the foundation: loader, zero page, e820, MP table,
SMP start-up, the UART with interrupts, the i8042 reset, the CLI and the JSON config.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import zlib

import pytest

from helpers.vmproc import Qmp, VmProcess, run_stratovirt

pytestmark = pytest.mark.kvm

MiB = 1 << 20


def boot(probe_elf, *extra, append="console=ttyS0", **kw) -> VmProcess:
    args = ["-kernel", str(probe_elf), "-serial", "stdio", "-D", *extra]
    if append is not None:
        args += ["-append", *append.split()]
    vm = VmProcess(args, **kw)
    vm.wait_for(r"(?m)^ready\r?$", 60)
    return vm


def e820_ram(lines: list[str]) -> list[tuple[int, int]]:
    out = []
    for ln in lines:
        m = re.match(r"e820: addr=(0x[0-9a-f]+) size=(0x[0-9a-f]+) type=1", ln)
        if m:
            out.append((int(m.group(1), 16), int(m.group(2), 16)))
    return out


def test_banner_cmdline_memory_and_smp(probe_elf):
    with boot(probe_elf, "-smp", "2", "-m", "256M", append="console=ttyS0 foo=bar reboot=k") as vm:
        text = vm.serial()
        assert text.startswith("pystratovirt probe guest")
        assert re.search(r"(?m)^cmdline: console=ttyS0 foo=bar reboot=k", text)
        assert "arg foo=bar" in text
        assert "cpus: 2 in MP table" in text
        assert re.search(r"(?m)^cpus online: 2\r?$", text)
        ram = e820_ram(vm.command("mem"))
        # RAM is everything but the EBDA below 1 MiB and the BIOS area.
        assert ram == [(0, 0x9FC00), (0x100000, 256 * MiB - 0x100000)]
        assert vm.command("echo hello world") == ["hello world"]
        vm.send("reboot\n")
        assert vm.wait_exit(30) == 0
        assert "guest-reset" in vm.err.text()


def test_memory_above_the_32bit_hole(probe_elf):
    with boot(probe_elf, "-m", "4G") as vm:
        ram = e820_ram(vm.command("mem"))
        assert (0x100000, 0xC000_0000 - 0x100000) in ram
        assert (0x1_0000_0000, 1 << 30) in ram
        # The last page below the hole is real RAM: write and read it back through the guest.
        vm.command("poke bffff000 5a")
        assert vm.command("peek bffff000") == ["value: 0x5a"]


def test_initrd_is_loaded_intact(probe_elf, tmp_path):
    blob = os.urandom(300_000)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(blob)
    with boot(probe_elf, "-initrd", str(initrd)) as vm:
        line = vm.command("initrd")[0]
        m = re.search(r"addr=(0x[0-9a-f]+) size=(0x[0-9a-f]+|\d+)", line)
        assert m, line
        addr, size = int(m.group(1), 16), int(m.group(2), 0)
        assert size == len(blob) and addr % 4096 == 0
        crc = vm.command(f"crc32 {addr:x} {size:x}")[0]
        assert f"{zlib.crc32(blob):08x}" in crc


def test_initrd_of_a_held_vm_is_copied_when_it_first_runs(probe_elf, tmp_path):
    """With -S the initrd stays in its file (opened and checked at start) until cont: removing
    the file meanwhile changes nothing, and the guest gets every byte."""
    blob = os.urandom(200_000)
    initrd, sock = tmp_path / "initrd.img", tmp_path / "qmp.sock"
    initrd.write_bytes(blob)
    args = ["-kernel", str(probe_elf), "-serial", "stdio", "-D", "-append", "console=ttyS0",
            "-initrd", str(initrd), "-api-channel", f"unix:{sock}", "-S"]
    with VmProcess(args) as vm, Qmp(sock) as qmp:
        qmp.execute("qmp_capabilities")
        assert qmp.execute("query-status")[1]["return"]["running"] is False
        initrd.unlink()
        assert qmp.execute("cont")[1] == {"return": {}}
        vm.wait_for(r"(?m)^ready\r?$", 60)
        line = vm.command("initrd")[0]
        m = re.search(r"addr=(0x[0-9a-f]+) size=(0x[0-9a-f]+|\d+)", line)
        assert m, line
        addr, size = int(m.group(1), 16), int(m.group(2), 0)
        assert size == len(blob)
        assert f"{zlib.crc32(blob):08x}" in vm.command(f"crc32 {addr:x} {size:x}")[0]
        assert "kernel and initrd copied into guest RAM" in vm.err.text()


def test_serial_input_uses_interrupts(probe_elf):
    with boot(probe_elf) as vm:
        before = vm.command("irqs")
        for i in range(3):
            time.sleep(0.3)  # let the guest go idle (sti; hlt): only the UART's interrupt wakes it
            assert vm.command(f"echo line{i}") == [f"line{i}"]
        after = vm.command("irqs")
        def count(lines):
            for ln in lines:
                m = re.search(r"vector=0x21 name=serial count=(\d+)", ln)
                if m:
                    return int(m.group(1))
            raise AssertionError(f"no serial vector in {lines}")
        assert count(after) > count(before)


def test_triple_fault_ends_the_vmm_cleanly(probe_elf):
    with boot(probe_elf) as vm:
        vm.send("triple\n")
        assert vm.wait_exit(30) == 0
        assert "guest-reset" in vm.err.text()


def test_sigterm_shuts_down_cleanly(probe_elf):
    with boot(probe_elf) as vm:
        vm.signal(signal.SIGTERM)
        assert vm.wait_exit(30) == 0
        assert "host-signal" in vm.err.text()


def test_json_config_and_command_line_override(probe_elf, tmp_path):
    cfg = {
        "boot-source": {"kernel_image_path": str(probe_elf), "boot_args": "console=ttyS0 from=json"},
        "machine-config": {"vcpu_count": 2, "mem_size": 512 * MiB},
        "serial": {"stdio": True},
    }
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(cfg))
    vm = VmProcess(["-config", str(path), "-m", "384M", "-D"])
    with vm:
        vm.wait_for(r"(?m)^ready\r?$", 60)
        text = vm.serial()
        assert "arg from=json" in text
        assert re.search(r"(?m)^cpus online: 2\r?$", text)
        assert e820_ram(vm.command("mem"))[-1] == (0x100000, 384 * MiB - 0x100000)


@pytest.mark.parametrize("args, needle", [
    (["--unsupport"], "Found argument '--unsupport' which wasn't expected"),
    (["-kernel", "/nonexistent/vmlinux.bin"], "/nonexistent/vmlinux.bin"),
    (["-m", "64M"], "Size of memory should be less than 512G and more than 128M."),
])
def test_bad_input_is_one_sentence_and_exit_1(probe_elf, args, needle):
    if "-kernel" not in args:
        args = ["-kernel", str(probe_elf)] + args
    res = run_stratovirt(args)
    assert res.returncode == 1
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_not_a_kernel_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"")
    res = run_stratovirt(["-kernel", str(junk)])
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_existing_socket_path_is_refused(probe_elf, tmp_path):
    sock = tmp_path / "vm.sock"
    sock.write_text("")
    res = run_stratovirt(["-kernel", str(probe_elf), "-api-channel", f"unix:{sock}"])
    assert res.returncode == 1
    assert "already exists" in res.stderr or "exist" in res.stderr
    assert "Traceback" not in res.stderr
    assert sock.read_text() == ""  # never unlinked or replaced


def test_raw_vmlinux_bin_format(probe_elf, tmp_path):
    """The flat ``objcopy -O binary`` image early StratoVirt boots: loaded and entered at 16 MiB."""
    import shutil
    import subprocess
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        pytest.skip("objcopy (binutils) is not installed")
    raw = tmp_path / "probe.bin"
    subprocess.run([objcopy, "-O", "binary", str(probe_elf), str(raw)], check=True)
    with boot(raw, append="console=ttyS0 format=raw") as vm:
        assert "arg format=raw" in vm.serial()
        assert "vmlinux-raw" in vm.err.text()
        vm.send("reboot\n")
        assert vm.wait_exit(30) == 0


def test_an_application_processor_answers_ipis(probe_elf):
    with VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-smp", "2"]) as vm:
        vm.wait_for(r"(?m)^ready\r?$", 60)
        assert vm.command("ipi 1") == ["cpu 1: ipis=1"]
        assert vm.command("ipi 1") == ["cpu 1: ipis=2"]
        vm.send("ipi 0\n")
        vm.wait_for(r"error: cpu 0 is not an online application processor")
