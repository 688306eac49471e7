"""virtio-balloon driven by the probe guest under real KVM: guest memory really goes back to the
host, and QMP reports what the guest actually gave."""

from __future__ import annotations

import time

import pytest

from helpers.vmproc import Qmp, VmProcess, vmm_rss, wait_for_path

pytestmark = pytest.mark.kvm

MiB = 1 << 20
RAM = 1024 * MiB
POOL = 0x2000000  # the probe's balloon pages start at 32 MiB, lowest first


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


BALLOON_PATH = "/machine/peripheral/balloon"
UNSET = (1 << 64) - 1


def guest_stats(qmp) -> dict:
    _, reply = qmp.execute("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})
    return reply["return"]


def test_guest_statistics_through_qom_get(probe_elf, tmp_path):
    """The probe posts its statistics at start; with a polling interval set the VMM hands the
    buffer back every interval, and the free memory it reports follows the balloon."""
    sock = tmp_path / "s"
    with boot(probe_elf, sock, "-balloon", "deflate-on-oom=false") as vm, Qmp(sock) as qmp:
        assert "STATS_VQ" in " ".join(vm.command("balloon info"))
        first = guest_stats(qmp)
        assert list(first) == ["last-update", "stats"]
        assert abs(first["last-update"] - time.time()) < 60
        stats = first["stats"]
        assert list(stats)[:2] == ["stat-swap-in", "stat-swap-out"] and len(stats) == 10
        # Reported what the probe knows; the rest is QEMU's "unset" value.
        assert 0.9 * RAM < stats["stat-total-memory"] <= RAM
        free0 = stats["stat-free-memory"]
        assert 0 < free0 < stats["stat-total-memory"] and stats["stat-available-memory"] == free0
        assert stats["stat-swap-in"] == UNSET and stats["stat-disk-caches"] == UNSET

        # Not polled yet: asking the probe finds no request.
        assert "balloon: stats not requested" in " ".join(vm.command("balloon stats 100"))
        _, reply = qmp.execute("qom-get", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval"})
        assert reply == {"return": 0}
        assert qmp.execute("qom-set", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval",
                                       "value": 1})[1] == {"return": {}}

        give = 64 * MiB
        qmp.execute("balloon", {"value": RAM - give})
        vm.command("balloon run 3000", timeout=120)
        out = " ".join(vm.command("balloon stats 5000", timeout=30))
        assert "balloon: stats answered" in out, out
        # The refilled buffer reaches the device's I/O thread a moment after the probe's kick.
        deadline = time.monotonic() + 5
        while True:
            after = guest_stats(qmp)
            if after["stats"]["stat-free-memory"] == free0 - give or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert after["last-update"] >= first["last-update"]
        assert after["stats"]["stat-free-memory"] == free0 - give

        # Polling off: the buffer stays with the probe.
        qmp.execute("qom-set", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval", "value": 0})
        time.sleep(1.5)
        vm.command("balloon stats 10")  # answers a request that was already in flight, if any
        assert "balloon: stats not requested" in " ".join(vm.command("balloon stats 1500", timeout=30))


def test_qom_errors(probe_elf, tmp_path):
    sock = tmp_path / "s"
    with boot(probe_elf, sock, "-balloon", "deflate-on-oom=false"), Qmp(sock) as qmp:
        def err(cmd, args):
            _, reply = qmp.execute(cmd, args)
            return reply["error"]
        assert err("qom-get", {"path": "/machine/peripheral/nope", "property": "guest-stats"}) == {
            "class": "DeviceNotFound", "desc": "Device '/machine/peripheral/nope' not found"}
        assert err("qom-get", {"path": BALLOON_PATH, "property": "size"}) == {
            "class": "GenericError", "desc": "Property 'virtio-balloon-device.size' not found"}
        prop = "guest-stats-polling-interval"
        for value, desc in ((-1, "timer value must be greater than zero"),
                            (1 << 32, "timer value is too big"),
                            ("2", "Invalid parameter type for 'value', expected: integer"),
                            (True, "Invalid parameter type for 'value', expected: integer")):
            assert err("qom-set", {"path": BALLOON_PATH, "property": prop, "value": value})["desc"] == desc
        assert err("qom-set", {"path": BALLOON_PATH, "property": "guest-stats", "value": 1})["desc"] == \
            "Property 'virtio-balloon-device.guest-stats' is not writable"
        assert err("qom-set", {"path": BALLOON_PATH, "property": prop})["desc"] == "Parameter 'value' is missing"
        assert err("qom-get", {"path": BALLOON_PATH})["desc"] == "Parameter 'property' is missing"
        # Still alive and well.
        assert qmp.execute("query-balloon")[1] == {"return": {"actual": RAM}}


def test_qom_without_balloon(probe_elf, tmp_path):
    sock = tmp_path / "s"
    with boot(probe_elf, sock), Qmp(sock) as qmp:
        _, reply = qmp.execute("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})
        assert reply["error"]["class"] == "DeviceNotFound"
