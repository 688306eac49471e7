"""A lean Linux guest held before it mounts root, for the slow device tiers.

Without guest user space (DEVELOPERS.md) the checks run while the kernel waits ``rootdelay=``
seconds before mounting ``/dev/vda``: every driver has probed and ``ip=`` has configured eth0
(GUEST_IP, its gateway HOST_IP on the test's tap), so hot-plug, ping and the balloon can be
watched through what the kernel itself does.
"""

from __future__ import annotations

import struct
from pathlib import Path

from helpers.vmproc import Qmp, VmProcess, wait_for_path

GUEST_IP = "10.0.2.15"     # inside the test's own network namespace only
HOST_IP = "10.0.2.1"


def held_linux_args(guest, *, ram_mib: int, rootfs: Path, root_delay: int, sock: Path, log: Path,
                    extra_cmdline: str = "", extra_args: tuple[str, ...] = ()) -> list[str]:
    """The VMM's arguments: 2 vCPUs, the root disk in slot 0, eth0 on tap0, a balloon."""
    cmdline = (f"{guest.cmdline} root=/dev/vda rw rootdelay={root_delay} "
               f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off {extra_cmdline}").strip()
    return ["-kernel", str(guest.bzimage), "-append", cmdline, "-smp", "2", "-m", f"{ram_mib}M",
            *extra_args, "-drive", f"file={rootfs},id=rootfs,direct=off",
            "-netdev", "id=net0,netdev=tap0", "-balloon", "deflate-on-oom=true",
            "-serial", "stdio", "-api-channel", f"unix:{sock}", "-D", str(log)]


def wait_held(vm: VmProcess, sock: Path, root_delay: int, timeout: float = 900) -> Qmp:
    """Connect QMP, then wait until the kernel says it is waiting for root."""
    wait_for_path(sock, 120)
    qmp = Qmp(sock)
    vm.wait_for(rf"Waiting {root_delay} sec before mounting root", timeout)
    return qmp


def ext4_mount_count(path: Path) -> int:
    """The ext4 superblock's mount count: a kernel that mounted the image wrote it back."""
    with open(path, "rb") as f:
        f.seek(1024 + 0x34)
        return struct.unpack("<H", f.read(2))[0]
