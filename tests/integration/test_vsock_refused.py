"""``-device vsock`` through the real ``stratovirt`` process: the descriptor Kata would pass as
``vhostfd=`` (inherited, as Kata's fd 3) is checked with the real vhost ioctl and refused with one
sentence; without one, this host's missing /dev/vhost-vsock is the sentence. No traceback, exit
code 1, and nothing left behind."""

from __future__ import annotations

import os

import pytest

from helpers.vmproc import run_stratovirt
from pystratovirt.virtio.vhost_vsock import VHOST_VSOCK_PATH

pytestmark = pytest.mark.kvm


def refused(args, **kw) -> str:
    result = run_stratovirt(args, **kw)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


def test_inherited_regular_file_is_not_a_vhost_vsock(probe_elf, tmp_path):
    path = tmp_path / "not-vhost"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        msg = refused(["-kernel", str(probe_elf), "-device", f"vsock,id=vsock-id,guest-cid=3,vhostfd={fd}"],
                      pass_fds=(fd,))
    finally:
        os.close(fd)
    assert msg == (f"stratovirt: vhostfd={fd} is a regular file, not a vhost-vsock device (VHOST_GET_FEATURES "
                   "failed: Inappropriate ioctl for device).")


def test_inherited_tap_is_not_a_vhost_vsock(probe_elf):
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        msg = refused(["-kernel", str(probe_elf), "-device", f"vsock,id=v,guest-cid=3,vhostfd={fd}"], pass_fds=(fd,))
    finally:
        os.close(fd)
    assert msg.startswith(f"stratovirt: vhostfd={fd} is a tun/tap device, not a vhost-vsock device")


def test_a_number_that_is_not_open(probe_elf):
    msg = refused(["-kernel", str(probe_elf), "-device", "vsock,id=v,guest-cid=3,vhostfd=1000"])
    assert msg == "stratovirt: File descriptor 1000 was not passed to this VMM (use getfd, or pass it at start-up)."


def test_no_descriptor_and_no_vhost_vsock_on_this_host(probe_elf, tmp_path):
    if os.path.exists(VHOST_VSOCK_PATH):
        pytest.skip("this host has /dev/vhost-vsock")
    sock = tmp_path / "qmp.sock"
    msg = refused(["-kernel", str(probe_elf), "-device", "vsock,id=vsock-7,guest-cid=7",
                   "-api-channel", f"unix:{sock}"])
    assert msg == ("stratovirt: vhost-vsock needs /dev/vhost-vsock, which does not exist on this host (its "
                   "kernel has no vhost_vsock module loaded).")
    assert not sock.exists()
