"""ioctl number helpers (checked against values from <asm-generic/ioctl.h>) and the ioctl call."""

import ctypes
import errno
import os

import pytest

from pystratovirt.kvm import ioctl as k


def test_ioc_helpers_match_the_c_macros():
    # _IO(0xAE, 0x80): no direction, no size.
    assert k._IO(0xAE, 0x80) == 0xAE80
    # _IOR(type, nr, size) sets direction 2 in the top bits and the size at bit 16.
    assert k._IOR(0xAE, 0x81, 144) == (2 << 30) | (144 << 16) | (0xAE << 8) | 0x81
    assert k._IOW(0xAE, 0x82, 144) == (1 << 30) | (144 << 16) | (0xAE << 8) | 0x82
    assert k._IOWR(0xAE, 0x85, 24) == (3 << 30) | (24 << 16) | (0xAE << 8) | 0x85
    # A ctypes type is measured like sizeof(type) in C.
    assert k._IOW(0xAE, 0x48, ctypes.c_uint64) == 0x4008AE48
    # Well-known non-KVM value: TCGETS is _IO('T', 1) on x86 = 0x5401.
    assert k._IO(ord("T"), 0x01) == 0x5401
    # FIONREAD-style _IOR('f', 127, int) from asm-generic = 0x8004667f.
    assert k._IOR(ord("f"), 127, ctypes.c_int) == 0x8004667F


def test_ioc_rejects_sizes_that_do_not_fit():
    with pytest.raises(ValueError):
        k._IOW(0xAE, 1, 1 << 14)
    with pytest.raises(ValueError):
        k._IO(0x100, 1)
    with pytest.raises(ValueError):
        k._IO(0xAE, 0x100)


def test_ioctl_raises_oserror_with_errno():
    with pytest.raises(OSError) as info:
        k.ioctl(-1, k.KVM_GET_API_VERSION)
    assert info.value.errno == errno.EBADF


def test_ioctl_on_a_non_kvm_fd_is_enotty():
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            k.ioctl(fd, k.KVM_GET_API_VERSION)
        assert info.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


def test_eintr_becomes_interrupted_error():
    exc = OSError(errno.EINTR, "x")
    assert isinstance(exc, InterruptedError)
    assert k.is_eintr(exc)
