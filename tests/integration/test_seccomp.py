"""seccomp in the running VMM: every thread filtered by default, nothing filtered with
``-disable-seccomp``, and a whole probe-guest life cycle (boot, disk and NIC I/O and hot-plug,
balloon, stop/cont, quit; and SIGTERM) needs nothing outside the allow-lists: a single
forbidden call would kill the VMM with SIGSYS and fail the test."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from helpers.lifecycle import Lifecycle
from helpers.vmproc import VmProcess

pytestmark = pytest.mark.kvm


def thread_status(pid: int) -> dict[str, dict[str, str]]:
    """comm/tid -> {Seccomp, NoNewPrivs} of every thread of ``pid`` that runs VMM code (KVM's
    own kernel worker, ``kvm-nx-lpage-recovery``, also lives in the thread group: left out)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        comm = (task / "comm").read_text().strip()
        if comm.startswith("kvm-"):
            continue
        fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        threads[f"{comm}/{task.name}"] = {k: fields[k].strip() for k in ("Seccomp", "NoNewPrivs")}
    return threads


def kinds(threads: dict) -> set[str]:
    return {name.split("/")[0].rstrip("0123456789") for name in threads}


def test_whole_life_cycle_with_seccomp_on(probe_elf, ns, tmp_path):
    life = Lifecycle(probe_elf, tmp_path, ns)
    try:
        life.boot()
        threads = thread_status(life.vmm_pid())
        # Two vCPUs, the I/O threads of the six disks, the two NICs (queues and tap), the balloon,
        # the rng and the console (queues and chardev).
        assert {"vcpu", "virtio-blk", "virtio-net", "virtio-balloon", "virtio-rng",
                "virtio-console"} <= kinds(threads), threads
        assert len(threads) == 1 + 2 + 6 + 2 + 1 + 1 + 1, threads  # a NIC and its tap share one
        assert all(t == {"Seccomp": "2", "NoNewPrivs": "1"} for t in threads.values()), threads
        life.exercise()
        assert life.quit() == 0
        assert not life.sock.exists()
    finally:
        life.close()


def test_sigterm_with_seccomp_on(probe_elf, ns, tmp_path):
    life = Lifecycle(probe_elf, tmp_path, ns)
    try:
        life.boot()
        life.vm.command("blk 0 write 100 2 5a")
        assert life.sigterm() == 0
        assert "Traceback" not in life.vm.err.text()
        assert not life.sock.exists()
    finally:
        life.close()


def test_disable_seccomp_runs_without_filters(probe_elf, ns, tmp_path):
    life = Lifecycle(probe_elf, tmp_path, ns, extra_args=["-disable-seccomp"])
    try:
        life.boot()
        threads = thread_status(life.vmm_pid())
        assert len(threads) == 14 and {"vcpu", "virtio-blk"} <= kinds(threads), threads
        assert all(t["Seccomp"] == "0" for t in threads.values()), threads
        assert life.quit() == 0
    finally:
        life.close()


def test_a_vmm_killed_by_its_filter_fails_whichever_test_started_it(probe_elf):
    """The test helpers check every VMM they stop: death by SIGSYS (what a call outside the
    allow-list causes) fails the test even if the test looked at nothing else, so the whole
    suite, the slow Linux tiers included, doubles as the allow-lists' measurement."""
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-append", "console=ttyS0"])
    vm.wait_for(r"(?m)^ready\r?$", 60)
    os.kill(vm.pid, signal.SIGSYS)   # what the kernel sends on a forbidden call
    vm.proc.wait(10)
    with pytest.raises(AssertionError, match="killed by its seccomp filter"):
        vm.kill()
