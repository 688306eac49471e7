"""vhost-net (``vhost=on``): the refusal path, and why there is no data path behind it.

Owns: deciding what a user who asks for the in-kernel virtio-net data path (``-netdev
...,vhost=on`` or ``vhostfds=``) is told, as one :class:`VhostNetError` sentence.

vhost-net would hand the rings to the kernel: /dev/vhost-net with VHOST_SET_OWNER,
VHOST_SET_FEATURES, VHOST_SET_MEM_TABLE (the guest RAM regions), VHOST_SET_VRING_NUM/ADDR/BASE/
KICK/CALL per queue (the transport's notify eventfds as kicks, the interrupt eventfd as call) and
VHOST_NET_SET_BACKEND (the tap fd). None of that is implemented: the development host's kernel is
built without CONFIG_VHOST_NET and has no modules, so the code could not be run even once, and an
untested data path that writes guest memory from the kernel is worse than none. Asking for it is
therefore an error with the reason, never a silent fallback to the user-space data path (a user
who asked for vhost would otherwise measure the wrong thing). StratoVirt also fails to start when
vhost-net cannot be set up.
"""

from __future__ import annotations

import os
from typing import NoReturn

from ..errors import PyStratoVirtError

VHOST_NET_PATH = "/dev/vhost-net"


class VhostNetError(PyStratoVirtError):
    """vhost-net cannot be used; the message is one sentence for the user."""


def unavailable_reason(path: str = VHOST_NET_PATH) -> str:
    """Why ``vhost=on`` cannot work on this host with this VMM (always a reason: see above)."""
    if not os.path.exists(path):
        return (f"vhost=on needs {path}, which does not exist on this host (its kernel has no "
                "vhost_net module loaded); use vhost=off.")
    return ("vhost=on is not supported by this VMM: its vhost-net data path is not implemented "
            "(it could not be tested on the development host); use vhost=off.")


def open_vhost_net(vhostfd: int | str | None = None, path: str = VHOST_NET_PATH) -> NoReturn:
    """Set up vhost-net for a NIC (``vhostfd``: a descriptor passed with ``vhostfds=``).

    Always raises :class:`VhostNetError` with the reason; the machine reports it and does not
    start (or refuses the ``netdev_add``).
    """
    if vhostfd is not None:
        raise VhostNetError(f"vhostfds={vhostfd} was given, but this VMM has no vhost-net data path "
                            "(it could not be tested on the development host); use vhost=off.")
    raise VhostNetError(unavailable_reason(path))
