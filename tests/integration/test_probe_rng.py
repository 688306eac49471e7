"""virtio-rng driven by the probe guest under real KVM: random bytes from the host's source reach
the guest, and the rate limit (``-rng ...,bytes_per_sec=``) holds by the guest's clock and by
the host's."""

from __future__ import annotations

import json
import re
import time

import pytest

from helpers.vmproc import VmProcess, run_stratovirt

pytestmark = pytest.mark.kvm


def boot(probe_elf, *extra) -> VmProcess:
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-D", "-m", "256M", *extra])
    vm.wait_for(r"(?m)^ready\r?$", 60)
    return vm


def rng_line(out: list[str], kind: str = "") -> dict[str, str]:
    line = next(ln for ln in out if ln.startswith(f"rng: {kind}".rstrip()))
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_random_bytes_reach_the_guest(probe_elf):
    with boot(probe_elf, "-rng", "random_file=/dev/urandom") as vm:
        listing = vm.serial()
        assert re.search(r"virtio: \d+ base=0x[0-9a-f]+ irq=\d+ id=4 \(rng\)", listing)
        info = " ".join(vm.command("rng info"))
        assert "VERSION_1" in info
        a = rng_line(vm.command("rng read 4096", timeout=60))
        b = rng_line(vm.command("rng read 4096", timeout=60))
        assert a["bytes"] == b["bytes"] == "4096"
        # Not constant, not a short pattern: 4 KiB of random bytes show (nearly) every value.
        assert int(a["distinct"]) >= 240 and int(b["distinct"]) >= 240
        assert a["crc32"] != b["crc32"] and a["first"] != b["first"]
        assert a["partial"] == "0"


def test_rate_limit_holds_by_both_clocks(probe_elf):
    """1024 bytes per second: 4 KiB takes at least three turns of the period."""
    with boot(probe_elf, "-rng", "random_file=/dev/urandom,bytes_per_sec=1024") as vm:
        started = time.monotonic()
        r = rng_line(vm.command("rng rate 4096", timeout=120), "rate")
        host_seconds = time.monotonic() - started
        assert r["bytes"] == "4096"
        guest_seconds = int(r["us"]) / 1e6
        assert guest_seconds >= 2.9, r
        assert host_seconds >= 2.9
        assert int(r["bytes_per_s"]) <= 1400
        # A second read right away also waits for the periods: the budget is not per command.
        r2 = rng_line(vm.command("rng rate 2048", timeout=120), "rate")
        assert int(r2["us"]) / 1e6 >= 0.9


def test_without_a_limit_it_is_far_faster(probe_elf):
    with boot(probe_elf, "-rng", "random_file=/dev/urandom") as vm:
        r = rng_line(vm.command("rng rate 4096", timeout=60), "rate")
        assert int(r["us"]) / 1e6 < 1.5, r


def test_rng_from_the_json_config(probe_elf, tmp_path):
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"boot-source": {"kernel_image_path": str(probe_elf)},
                               "rng": {"random_file": "/dev/urandom"}}))
    vm = VmProcess(["-config", str(cfg), "-serial", "stdio", "-D"])
    with vm:
        vm.wait_for(r"(?m)^ready\r?$", 60)
        assert rng_line(vm.command("rng read 64"))["bytes"] == "64"


def test_unreadable_source_is_a_start_up_error(probe_elf, tmp_path):
    result = run_stratovirt(["-kernel", str(probe_elf), "-rng", f"random_file={tmp_path}"])
    assert result.returncode == 1
    assert result.stderr.strip() == (f"stratovirt: The random source '{tmp_path}' is not a character device, "
                                     "FIFO or regular file.")
    assert "Traceback" not in result.stderr
