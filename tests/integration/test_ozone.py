"""A VM started through ``ozone``: jailed, unprivileged, confined, and cleaned up.

The VMM runs as ``nobody`` with no capabilities, in its own mount/PID/IPC/UTS namespaces and the
test's network namespace, chrooted into its per-VM directory: it boots the probe guest, takes a
disk hot-plugged from inside the jail, finds no host file by any path, and ``-clean-resource``
removes the directory and the cgroups it made.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from helpers.vmproc import Qmp, VmProcess
from pystratovirt.ozone import cgroups

pytestmark = pytest.mark.kvm

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
_seq = itertools.count()
SECTOR = 512


class Jail:
    def __init__(self, tmp_path: Path, ns, probe_elf):
        self.tmp = tmp_path
        self.name = f"t{os.getpid()}-{next(_seq)}"
        # A short base: the QMP socket's path must fit sockaddr_un (107 bytes).
        self.base = Path(tempfile.mkdtemp(prefix="oz-", dir="/tmp"))
        self.dir = self.base / "stratovirt" / self.name
        self.env = {"OZONE_BASE_DIR": str(self.base), "PYTHONPATH": str(REPO)}
        # The VMM program ozone runs: this worktree's pystratovirt under this interpreter.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        self.exec_file = bin_dir / "stratovirt"
        self.exec_file.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m pystratovirt \"$@\"\n")
        self.exec_file.chmod(0o755)
        self.root_img = tmp_path / "root.img"
        self.root_img.write_bytes(bytes((i * 7) & 0xFF for i in range(1 << 20)))
        self.ns = ns
        self.probe = Path(probe_elf)

    def ozone(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pystratovirt.ozone", "-name", self.name, "-exec_file",
                str(self.exec_file), "-uid", str(NOBODY), "-gid", str(NOBODY), *args]

    def start(self) -> VmProcess:
        program = self.ozone("-source", str(self.probe), str(self.root_img),
                             "-netns", f"/run/netns/{self.ns.name}",
                             "-cgroup", "memory.limit_in_bytes=1073741824", "pids.max=200", "--")
        vm = VmProcess(["-kernel", self.probe.name, "-serial", "stdio", "-D", "-api-channel", "unix:qmp.sock",
                        "-drive", f"file={self.root_img.name},id=rootfs,direct=off"],
                       program=program, env=self.env)
        vm.wait_for(r"(?m)^ready\r?$", 90)
        return vm

    def clean(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.ozone("-clean-resource"), capture_output=True, text=True,
                              env={**os.environ, **self.env}, timeout=60)


def vmm_pid(root_pid: int) -> int:
    todo = [root_pid]
    while todo:
        pid = todo.pop(0)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        if b"-run-with" in cmdline:
            return pid
        todo.extend(int(c) for c in children)
    raise AssertionError("no VMM process under ozone")


def status(pid: int, tid: int | str | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    return {k: v.strip() for k, _, v in (line.partition(":") for line in Path(path).read_text().splitlines())}


def qmp_error(qmp: Qmp, command: str, arguments: dict) -> str:
    events, reply = qmp.execute(command, arguments)
    assert "error" in reply, reply
    return reply["error"]["desc"]


def blockdev(name: str, filename: str) -> dict:
    return {"node-name": name, "file": {"driver": "file", "filename": filename}, "cache": {"direct": False}}


@pytest.fixture
def jail(tmp_path, ns, probe_elf):
    j = Jail(tmp_path, ns, probe_elf)
    yield j
    j.clean()
    shutil.rmtree(j.base, ignore_errors=True)


def test_vm_through_ozone_is_jailed_unprivileged_and_cleaned_up(jail):
    with jail.start() as vm:
        pid = vmm_pid(vm.pid)
        # Unprivileged, with nothing to regain, in every thread.
        for tid in os.listdir(f"/proc/{pid}/task"):
            st = status(pid, tid)
            if st["Name"].startswith("kvm-"):
                continue  # KVM's kernel worker in the thread group
            assert st["Uid"].split() == [str(NOBODY)] * 4 and st["Gid"].split() == [str(NOBODY)] * 4, st
            for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
                assert int(st[field], 16) == 0, (field, st)
            assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
        assert status(pid)["Groups"] == ""
        # Its root is the jail; its namespaces are its own, its network the one it was given.
        assert os.readlink(f"/proc/{pid}/root") == str(jail.dir)
        for kind in ("mnt", "pid", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{jail.ns.name}").st_ino
        assert status(pid)["NSpid"].split()[1] == "2"  # the namespace's init is ozone's, the VMM is next
        # The cgroup limits, in whichever hierarchy serves each controller here.
        own = Path(f"/proc/{pid}/cgroup").read_text()
        for hier in cgroups.hierarchies():
            for controller, file_v1, file_v2, value in (("memory", "memory.limit_in_bytes", "memory.max", "1073741824"),
                                                        ("pids", "pids.max", "pids.max", "200")):
                if controller in hier.controllers and (hier.version == 2 or
                                                       not any(h.version == 2 and controller in h.controllers
                                                               for h in cgroups.hierarchies())):
                    leaf = Path(hier.leaf("stratovirt", jail.name))
                    assert (leaf / (file_v2 if hier.version == 2 else file_v1)).read_text().strip() == value
                    assert f"/stratovirt/{jail.name}" in own

        with Qmp(jail.dir / "qmp.sock") as qmp:
            # A disk placed in the jail by the management, plugged by its name there.
            extra = jail.dir / "extra.img"
            data = os.urandom(2 << 20)
            extra.write_bytes(data)
            os.chown(extra, NOBODY, NOBODY)
            assert qmp.execute("blockdev-add", blockdev("d1", "extra.img"))[1] == {"return": {}}
            reply = qmp.execute("device_add", {"id": "d1", "driver": "virtio-blk-mmio", "addr": "0x1"})[1]
            assert reply == {"return": {}}
            out = vm.command("blk 1 wait-config 10000")
            assert f"capacity: {len(data) // SECTOR}" in out or f"capacity={len(data) // SECTOR}" in " ".join(out)
            assert f"0x{zlib.crc32(data[:8 * SECTOR]):08x}" in " ".join(vm.command("blk 1 read 0 8"))

            # No path reaches a root-only host file.
            assert os.path.exists("/etc/shadow")
            for path in ("../../etc/shadow", "/etc/shadow", "../../../../../../etc/shadow", "/proc/1/root/etc/shadow"):
                assert "No such file" in qmp_error(qmp, "blockdev-add", blockdev("x", path)), path
            os.symlink("/etc/shadow", jail.dir / "evil.img")
            os.symlink("../../../../../../../../etc/shadow", jail.dir / "evil2.img")
            for link in ("evil.img", "evil2.img"):
                assert "No such file" in qmp_error(qmp, "blockdev-add", blockdev("x", link)), link
            secret = jail.tmp / "secret.img"   # a root-only file that does sit in the jail
            secret.write_bytes(b"s" * 4096)
            secret.chmod(0o600)
            os.link(secret, jail.dir / "secret.img")
            # blockdev-add opens the image, and the VMM, no longer root, may not.
            assert "Permission denied" in qmp_error(qmp, "blockdev-add", blockdev("s1", "secret.img"))
            assert "Failed to find the configuration" in qmp_error(
                qmp, "device_add", {"id": "s1", "driver": "virtio-blk-mmio", "addr": "0x2"})
            assert vm.command("blk 2 info") and "capacity: 0" in " ".join(vm.command("blk 2 info")).replace("=", ": ")
            qmp.execute("quit")
        assert vm.wait_exit(30) == 0
    assert jail.dir.is_dir()  # kept until the management cleans up, as StratoVirt's ozone does

    res = jail.clean()
    assert res.returncode == 0, res.stderr
    assert not jail.dir.exists() and not (jail.base / "stratovirt").exists() and not os.listdir(jail.base)
    for hier in cgroups.hierarchies():
        assert not os.path.exists(hier.leaf("stratovirt", jail.name)), hier
    assert jail.root_img.exists() and secret.exists()  # the sources themselves are untouched


def test_sigterm_to_ozone_reaches_the_vmm(jail):
    with jail.start() as vm:
        pid = vmm_pid(vm.pid)
        os.kill(vm.pid, signal.SIGTERM)
        assert vm.wait_exit(30) == 0
        assert not os.path.exists(f"/proc/{pid}")
        assert not (jail.dir / "qmp.sock").exists()  # removed by the VMM from inside its jail
    assert jail.clean().returncode == 0
    assert not jail.dir.exists()


def test_killing_ozone_ends_the_vm(jail):
    with jail.start() as vm:
        pid = vmm_pid(vm.pid)
        vm.proc.kill()  # SIGKILL: ozone cannot forward anything
        vm.proc.wait(10)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "the VMM outlived its jailer"
    assert jail.clean().returncode == 0


def test_ozone_refuses_an_existing_jail_and_bad_input(jail):
    jail.dir.mkdir(parents=True)
    res = subprocess.run(jail.ozone("--", "-kernel", "k"), capture_output=True, text=True,
                         env={**os.environ, **jail.env}, timeout=60)
    assert res.returncode == 1 and "has already existed" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "pystratovirt.ozone", "-name", "../x", "-exec_file", "/bin/true",
                          "-uid", "0", "-gid", "0", "--", "x"], capture_output=True, text=True,
                         env={**os.environ, **jail.env}, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("ozone: Invalid name") and "Traceback" not in res.stderr
