"""vhost-vsock's descriptor checks (pystratovirt.virtio.vhost_vsock), with real descriptors and the
real VHOST_GET_FEATURES ioctl: every kind of wrong descriptor Kata's ``vhostfd=`` could be is
refused with a sentence naming it. This host has no vhost modules, so the one descriptor that
would pass (an open /dev/vhost-vsock) cannot be made here; see the module docstring."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from pystratovirt.virtio import vhost_vsock as vv
from pystratovirt.virtio.vhost_vsock import VhostVsockError, check_vhost_vsock_fd, open_vhost_vsock


def refusal(fd: int) -> str:
    with pytest.raises(VhostVsockError) as err:
        open_vhost_vsock(3, fd)
    return err.value.desc


def test_ioctl_numbers_match_the_kernel_header(tmp_path):
    if not shutil.which("gcc") or not os.path.exists("/usr/include/linux/vhost.h"):
        pytest.skip("needs gcc and <linux/vhost.h>")
    src = tmp_path / "v.c"
    src.write_text('#include <stdio.h>\n#include <linux/vhost.h>\n'
                   'int main(void) { printf("%lx %lx\\n", (unsigned long)VHOST_GET_FEATURES, '
                   '(unsigned long)VHOST_VSOCK_SET_GUEST_CID); return 0; }\n')
    subprocess.run(["gcc", "-o", str(tmp_path / "v"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "v")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(x, 16) for x in out] == [vv.VHOST_GET_FEATURES, vv.VHOST_VSOCK_SET_GUEST_CID]


def test_closed_descriptor():
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    assert refusal(fd) == f"vhostfd={fd} is not an open file descriptor."


def test_regular_file(tmp_path):
    with open(tmp_path / "f", "w") as f:
        assert refusal(f.fileno()) == (f"vhostfd={f.fileno()} is a regular file, not a vhost-vsock device "
                                       "(VHOST_GET_FEATURES failed: Inappropriate ioctl for device).")


def test_tap_device():
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        assert refusal(fd).startswith(f"vhostfd={fd} is a tun/tap device, not a vhost-vsock device "
                                      "(VHOST_GET_FEATURES failed: ")
    finally:
        os.close(fd)


def test_socket_pipe_and_other_character_device():
    a, b = socket.socketpair()
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDWR)
    try:
        assert refusal(a.fileno()).startswith(f"vhostfd={a.fileno()} is a socket, not a vhost-vsock device")
        assert refusal(r).startswith(f"vhostfd={r} is a pipe, not a vhost-vsock device")
        assert refusal(null).startswith(f"vhostfd={null} is character device 1:3, not a vhost-vsock device")
    finally:
        a.close()
        b.close()
        for fd in (r, w, null):
            os.close(fd)


def test_no_descriptor_and_no_device_node(tmp_path):
    with pytest.raises(VhostVsockError) as err:
        open_vhost_vsock(3, path=str(tmp_path / "vhost-vsock"))
    assert err.value.desc == (f"vhost-vsock needs {tmp_path / 'vhost-vsock'}, which does not exist on this "
                              "host (its kernel has no vhost_vsock module loaded).")


def test_no_descriptor_and_a_wrong_device_node():
    with pytest.raises(VhostVsockError) as err:
        open_vhost_vsock(3, path="/dev/null")
    assert err.value.desc.startswith("/dev/null is character device 1:3, not a vhost-vsock device")


def test_this_host_has_no_vhost_vsock():
    """The default path is the real one: on this host it is missing, and the sentence says so."""
    if os.path.exists(vv.VHOST_VSOCK_PATH):
        fd = os.open(vv.VHOST_VSOCK_PATH, os.O_RDWR)
        try:
            features = check_vhost_vsock_fd(fd, vv.VHOST_VSOCK_PATH)   # the real device passes the checks
            assert features & (1 << 32)
        finally:
            os.close(fd)
        with pytest.raises(VhostVsockError, match="not implemented"):
            open_vhost_vsock(3)
    else:
        with pytest.raises(VhostVsockError, match="does not exist on this host"):
            open_vhost_vsock(3)
