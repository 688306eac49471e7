"""virtio-balloon driven by the probe guest under real KVM: guest memory really goes back to the
host, and QMP reports what the guest actually gave."""

from __future__ import annotations

import time

import pytest

from helpers.vmproc import Qmp, VmProcess, wait_for_path

pytestmark = pytest.mark.kvm

MiB = 1 << 20
RAM = 1024 * MiB
POOL = 0x2000000  # the probe's balloon pages start at 32 MiB, lowest first


def vmm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss in smaps_rollup")


def boot(probe_elf, sock, *extra) -> VmProcess:
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-D", "-m", f"{RAM // MiB}M",
                    "-api-channel", f"unix:{sock}", *extra])
    vm.wait_for(r"(?m)^ready\r?$", 60)
    wait_for_path(sock)
    return vm


def balloon_events(events):
    return [e["data"]["actual"] for e in events if e["event"] == "BALLOON_CHANGED"]


def test_inflate_releases_host_memory_and_deflate_restores(probe_elf, tmp_path):
    sock = tmp_path / "s"
    with boot(probe_elf, sock, "-balloon", "deflate-on-oom=true") as vm, Qmp(sock) as qmp:
        assert qmp.execute("query-balloon")[1] == {"return": {"actual": RAM}}
        assert "DEFLATE_ON_OOM" in " ".join(vm.command("balloon info"))

        give = 256 * MiB
        vm.command(f"touch {POOL:x} {give:x}", timeout=120)
        rss_before = vmm_rss(vm.pid)
        assert rss_before >= give

        assert qmp.execute("balloon", {"value": RAM - give})[1] == {"return": {}}
        out = vm.command("balloon run 8000", timeout=180)
        assert f"balloon: actual={give // 4096}" in out
        assert qmp.execute("query-balloon")[1] == {"return": {"actual": RAM - give}}
        released = rss_before - vmm_rss(vm.pid)
        assert released >= 0.9 * give, f"RSS dropped by {released / MiB:.0f} MiB only"

        # Deflate: a value above RAM means all of it.
        _, reply = qmp.execute("balloon", {"value": 4 * RAM})
        assert reply == {"return": {}}
        out = vm.command("balloon run 8000", timeout=180)
        assert "balloon: actual=0" in out
        assert qmp.execute("query-balloon")[1] == {"return": {"actual": RAM}}
        # The pages come back on touch, with the guest none the worse.
        vm.command(f"touch {POOL:x} {16 * MiB:x}")


def test_balloon_changed_events(probe_elf, tmp_path):
    sock = tmp_path / "s"
    with boot(probe_elf, sock, "-balloon", "deflate-on-oom=false") as vm, Qmp(sock) as qmp:
        qmp.execute("balloon", {"value": RAM - 64 * MiB})
        vm.command("balloon run 2000", timeout=120)
        deadline = time.monotonic() + 5
        actuals = []
        qmp.sock.settimeout(0.5)
        while time.monotonic() < deadline and (not actuals or actuals[-1] != RAM - 64 * MiB):
            try:
                m = qmp.read()
            except (TimeoutError, OSError):
                continue
            if m.get("event") == "BALLOON_CHANGED":
                actuals.append(m["data"]["actual"])
        assert actuals and actuals[-1] == RAM - 64 * MiB
        assert len(actuals) <= 8  # coalesced: 64 MiB is 64 batches of 256 pages


def test_no_balloon_device(probe_elf, tmp_path):
    sock = tmp_path / "s"
    with boot(probe_elf, sock), Qmp(sock) as qmp:
        for cmd, args in (("balloon", {"value": 1 << 30}), ("query-balloon", None)):
            _, reply = qmp.execute(cmd, args)
            assert reply["error"] == {"class": "DeviceNotActive", "desc": "No balloon device has been activated"}
