"""The process's one handle on the C library, for the few calls Python's ``os`` module lacks
(``ioctl`` with a pointer argument for KVM_RUN, ``fallocate`` with hole-punching modes).

``use_errno=True`` makes ctypes capture errno per call and per thread, so concurrent threads never
see each other's errors; read it with ``ctypes.get_errno()`` right after the call.
"""

from __future__ import annotations

import ctypes
import os

LIBC = ctypes.CDLL(None, use_errno=True)


def check(result: int) -> int:
    """Raise OSError with the call's errno when a libc call returned -1; else return its result."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


# fallocate(2) modes (<linux/falloc.h>).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_fallocate = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                              use_errno=True)(("fallocate", LIBC))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError."""
    check(_fallocate(fd, mode, offset, length))
