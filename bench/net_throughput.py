#!/usr/bin/env python3
"""virtio-net throughput benchmark: frames per second through the VMM's user-space data path.

Set-up (no KVM, no guest kernel): a network namespace of its own with one tap; the VMM's
:class:`~pystratovirt.virtio.net.VirtioNet` behind a virtio-mmio transport opens the tap by name;
a driver in this process plays the guest, keeping a ring of 256 pre-built buffers busy; the far
end of the tap is the namespace's kernel.

* TX: the guest transmits as fast as the device completes chains; the frames that reached the
  host are counted by the tap's own receive counter (no addresses anywhere: the kernel counts
  and drops them).
* RX: a separate process in the namespace floods the tap through an AF_PACKET socket; the guest
  counts what lands in its receive buffers. Offered load beyond what the device reads waits in,
  then overflows, the tap's queue (its tx_dropped, shown as "tap drops").

The guest-side driver shares the Python interpreter (and its GIL) with the device's threads, as
driver.py does in the unit tests, so the rates are a lower bound for a real guest running on
its own vCPU threads. vhost-net rows show why they are missing when the host cannot do it.

    python bench/net_throughput.py               # 4 runs of 4 s each
    python bench/net_throughput.py --seconds 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import struct
import subprocess
import sys
import time

from pystratovirt.memory.guest import GuestMemory
from pystratovirt.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, bit
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import VirtioDriver
from pystratovirt.virtio.net import HDR_LEN, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VirtioNet
from pystratovirt.virtio.queue import vring_need_event
from pystratovirt.virtio.tap import Tap
from pystratovirt.virtio.vhost_net import unavailable_reason

CLONE_NEWNET = 0x40000000
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("02aabbccddee")
ETH_P_TEST = 0x88B5
RING = 256
SIZES = (64, 1514)   # Ethernet frame bytes without FCS: minimum-size and MTU-1500 frames
FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_RING_F_EVENT_IDX)

_libc = ctypes.CDLL(None, use_errno=True)

SENDER = r"""
import socket, sys, time
size, seconds, frame = int(sys.argv[1]), float(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("tap0", 0))
s.setblocking(False)
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.send(frame)
            sent += 1
        except BlockingIOError:
            pass
print(sent)
"""


class Namespace:
    def __init__(self) -> None:
        self.name = f"pstv-bench-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        self.ip("tuntap", "add", "dev", "tap0", "mode", "tap")
        self.ip("link", "set", "tap0", "up")

    def exec(self, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True,
                              capture_output=True, text=True).stdout

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, text=True).stdout

    def tap_stats(self) -> dict:
        return json.loads(self.ip("-j", "-s", "link", "show", "tap0"))[0]["stats64"]

    def open_tap(self) -> Tap:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                return Tap.open("tap0")
            finally:
                _libc.setns(own, CLONE_NEWNET)
        finally:
            os.close(own)
            os.close(target)

    def wait_carrier(self) -> None:
        for _ in range(500):
            link = json.loads(self.ip("-j", "link", "show", "tap0"))[0]
            if "LOWER_UP" in link["flags"] and link.get("qdisc") not in (None, "noop"):
                return
            time.sleep(0.01)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class BenchGuest:
    """A ring of pre-built buffers per queue, re-posted as soon as the device returns them."""

    def __init__(self, transport: VirtioMmio, mem: GuestMemory):
        self.drv = VirtioDriver(transport, mem, data_size=0x100_0000)
        self.drv.initialize(want=FEATURES)
        self.mem = mem
        self.addr: dict[int, tuple[int, int]] = {}

    def _post(self, qi: int, addr: int, length: int) -> None:
        if qi == 0:
            head = self.drv.submit(qi, [], [(addr, length)], publish=False)
        else:
            head = self.drv.submit(qi, [(addr, length)], [], publish=False)
        self.addr[(qi, head)] = (addr, length)

    def _publish(self, qi: int, old: int) -> None:
        self.drv.publish(qi)
        new = self.drv.queues[qi].avail_idx
        if vring_need_event(self.drv.avail_event(qi), new, old):
            self.drv.notify(qi)

    def fill(self, qi: int, length: int, data: bytes | None = None) -> None:
        for _ in range(RING):
            addr = self.drv.alloc(length, 64)
            if data is not None:
                self.mem.write(addr, data)
            self._post(qi, addr, length)
        self.drv.publish(qi)
        self.drv.notify(qi)

    def run(self, qi: int, seconds: float) -> tuple[int, float]:
        """Re-post every used buffer for ``seconds``; returns (buffers completed, elapsed)."""
        q = self.drv.queues[qi]
        done = 0
        start = time.monotonic()
        end = start + seconds
        while True:
            now = time.monotonic()
            if now >= end:
                return done, now - start
            used = self.drv.take_used(qi)
            if not used:
                self.drv.set_used_event(qi, q.last_used)   # interrupt on the next one
                used = self.drv.take_used(qi)
                if not used:
                    self.drv.wait_irq(0.005)
                    continue
            old = q.avail_idx
            # All buffers first: re-posting may reuse a descriptor id that is later in ``used``.
            for addr, length in [self.addr.pop((qi, head)) for head, _ in used]:
                self._post(qi, addr, length)
            done += len(used)
            self._publish(qi, old)


def one_run(ns: Namespace, direction: str, size: int, seconds: float) -> dict:
    mem = GuestMemory(64 << 20)
    dev = VirtioNet(ns.open_tap(), mac=GUEST_MAC, offloads=False)
    t = VirtioMmio(dev, mem, name="bench")
    t.start()
    try:
        guest = BenchGuest(t, mem)
        ns.wait_carrier()
        before = ns.tap_stats()
        if direction == "TX":
            frame = PEER_MAC + GUEST_MAC + struct.pack("!H", ETH_P_TEST) + bytes(size - 14)
            guest.fill(1, HDR_LEN + size, bytes(HDR_LEN) + frame)
            _done, elapsed = guest.run(1, seconds)
            time.sleep(0.05)
            frames = ns.tap_stats()["rx"]["packets"] - before["rx"]["packets"]
            extra = ""
        else:
            frame = GUEST_MAC + PEER_MAC + struct.pack("!H", ETH_P_TEST) + bytes(size - 14)
            guest.fill(0, HDR_LEN + 1526)
            sender = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", SENDER,
                                       str(size), str(seconds), frame.hex()], stdout=subprocess.PIPE, text=True)
            frames, elapsed = guest.run(0, seconds)
            offered = int(sender.communicate(timeout=seconds + 30)[0])
            drops = ns.tap_stats()["tx"]["dropped"] - before["tx"]["dropped"]
            extra = f"offered {offered / elapsed / 1000:.0f} kpps, tap drops {drops}"
        return {"frames": frames, "elapsed": elapsed, "extra": extra, "stats": dev.stats}
    finally:
        t.close(timeout=5)
        mem.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run (default 4)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        print("needs root and /dev/net/tun", file=sys.stderr)
        return 1
    ns = Namespace()
    rows = []
    try:
        for direction in ("TX", "RX"):
            for size in SIZES:
                res = one_run(ns, direction, size, args.seconds)
                pps = res["frames"] / res["elapsed"]
                rows.append(("user space", direction, size, pps, pps * size * 8 / 1e6, res["extra"]))
    finally:
        ns.close()
    print(f"{'data path':<12} {'dir':<4} {'frame':>6} {'kpps':>8} {'Mbit/s':>8}  notes")
    for path, direction, size, pps, mbit, extra in rows:
        print(f"{path:<12} {direction:<4} {size:>5}B {pps / 1000:>8.1f} {mbit:>8.1f}  {extra}")
    print(f"{'vhost-net':<12} {'-':<4} {'-':>6} {'-':>8} {'-':>8}  {unavailable_reason()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
