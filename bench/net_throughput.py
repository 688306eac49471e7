#!/usr/bin/env python3
"""virtio-net throughput benchmark: frames per second through the VMM's user-space data path,
beside the same tap driven straight by a process ("raw": the kernel's side alone).

Set-up (no KVM, no guest kernel): a network namespace of its own with one tap; the VMM's
:class:`~pystratovirt.virtio.net.VirtioNet` behind a virtio-mmio transport opens the tap by name.
The guest is a driver in a **process of its own** (forked after it initialised the device):
guest RAM is a memfd both map, the driver kicks through the notify eventfd and sleeps on the
interrupt eventfd, as ``bench/blk_throughput.py``'s does, so the device's thread has the VMM's
interpreter to itself. It keeps a ring of 256 buffers busy, taking back what the device used and
re-posting it in bulk (NAPI-like: it asks for an interrupt only when it found nothing to do).
The far end of the tap is the namespace's kernel.

* TX: the guest transmits as fast as the device completes chains; the frames that reached the
  host are counted by the tap's own receive counter (no addresses anywhere: the kernel counts
  and drops them). Raw: one process writes the same frames (vnet header included) to the tap.
* RX: a separate process in the namespace floods the tap through an AF_PACKET socket; the guest
  counts what lands in its receive buffers. Offered load beyond what the reader takes waits in,
  then overflows, the tap's queue (its tx_dropped, shown as "tap drops"). Raw: one process reads
  the tap with readv into a 12-byte header and a frame buffer, under the same flood.

vhost-net rows show why they are missing when the host cannot do it.

    python3 bench/net_throughput.py               # 4 s per run
    python3 bench/net_throughput.py --seconds 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's package

from pystratovirt.memory.guest import GuestMemory  # noqa: E402
from pystratovirt.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, bit  # noqa: E402
from pystratovirt.virtio.mmio import VirtioMmio  # noqa: E402
from pystratovirt.virtio.mock_driver import BulkRing, DriverProcess, VirtioDriver  # noqa: E402
from pystratovirt.virtio.net import HDR_LEN, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VirtioNet  # noqa: E402
from pystratovirt.virtio.queue import VIRTQ_DESC_F_WRITE  # noqa: E402
from pystratovirt.virtio.tap import Tap  # noqa: E402
from pystratovirt.virtio.vhost_net import unavailable_reason  # noqa: E402

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


_DESC = struct.Struct("<QIHH")


def _guest(mem: GuestMemory, drv: VirtioDriver, qi: int, bufs: list[tuple[int, int]], seconds: float,
           notify_fd: int, irq_fd: int, report_fd: int) -> None:
    """The driver loop, in the forked child: ring ``qi`` holds one single-buffer chain per entry
    of ``bufs`` (descriptor i is buffer i: device-writable for RX, device-readable for TX); every
    used chain is re-posted at once, in bulk. Writes "<chains used> <elapsed>" to ``report_fd``."""
    q = drv.queues[qi]
    ram = mem.view(0, mem.regions[0].size)
    ring = BulkRing(q, ram, mem.host_view_u16(), notify_fd, irq_fd)
    flags = VIRTQ_DESC_F_WRITE if qi == 0 else 0
    for i, (addr, length) in enumerate(bufs):
        _DESC.pack_into(ram, q.desc + 16 * i, addr, length, flags, 0)
    done = 0
    ring.post(list(range(len(bufs))))
    start = time.perf_counter()
    deadline = start + seconds
    os.eventfd_write(notify_fd, 1)
    while True:
        now = time.perf_counter()
        if now >= deadline:
            os.write(report_fd, f"{done} {now - start}\n".encode())
            return
        heads = ring.take_used()
        if not heads:
            ring.sleep(5)   # interrupt at the next used chain
            continue
        done += len(heads)
        old = ring.avail_idx
        ring.post(list(heads))
        ring.kick_if_asked(old)


def _sender(ns: Namespace, frame: bytes, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", SENDER,
                             str(len(frame)), str(seconds), frame.hex()], stdout=subprocess.PIPE, text=True)


def one_run(ns: Namespace, direction: str, size: int, seconds: float) -> dict:
    mem = GuestMemory.shared(64 << 20)
    dev = VirtioNet(ns.open_tap(), mac=GUEST_MAC, offloads=False)
    t = VirtioMmio(dev, mem, name="bench")
    try:
        drv = VirtioDriver(t, mem, data_size=0x100_0000)
        drv.initialize(want=FEATURES)
        ns.wait_carrier()
        if direction == "TX":
            qi = 1
            frame = PEER_MAC + GUEST_MAC + struct.pack("!H", ETH_P_TEST) + bytes(size - 14)
            length = HDR_LEN + size
        else:
            qi = 0
            frame = GUEST_MAC + PEER_MAC + struct.pack("!H", ETH_P_TEST) + bytes(size - 14)
            length = HDR_LEN + 1526
        bufs = []
        for _ in range(RING):
            addr = drv.alloc(length, 64)
            if direction == "TX":
                mem.write(addr, bytes(HDR_LEN) + frame)
            bufs.append((addr, length))
        (notify_fd, _), = [(fd, i) for fd, i in t.notify_eventfds() if i == qi]
        before = ns.tap_stats()
        driver = DriverProcess(lambda report_fd: _guest(mem, drv, qi, bufs, seconds, notify_fd, t.irq_eventfd,
                                                         report_fd))
        t.start()
        sender = _sender(ns, frame, seconds) if direction == "RX" else None
        done, elapsed = driver.result()
        time.sleep(0.05)
        after = ns.tap_stats()
        if direction == "TX":
            frames = after["rx"]["packets"] - before["rx"]["packets"]
            extra = ""
        else:
            frames = done
            offered = int(sender.communicate(timeout=seconds + 30)[0])
            extra = (f"offered {offered / elapsed / 1000:.0f} kpps, "
                     f"tap drops {after['tx']['dropped'] - before['tx']['dropped']}")
        return {"frames": frames, "elapsed": elapsed, "extra": extra}
    finally:
        t.close(timeout=5)
        mem.close()


def raw_run(ns: Namespace, direction: str, size: int, seconds: float) -> dict:
    """The same traffic with one process on the tap itself: writev of header + frame for TX,
    readv into a header and a frame buffer for RX."""
    tap = ns.open_tap()
    try:
        tap.set_offload(0)
        ns.wait_carrier()
        before = ns.tap_stats()
        fd = tap.fd
        hdr = bytearray(HDR_LEN)
        if direction == "TX":
            frame = PEER_MAC + GUEST_MAC + struct.pack("!H", ETH_P_TEST) + bytes(size - 14)
            iov = [hdr, frame]
            start = time.perf_counter()
            deadline = start + seconds
            sent = 0
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            while time.perf_counter() < deadline:
                for _ in range(64):
                    try:
                        os.writev(fd, iov)
                        sent += 1
                    except BlockingIOError:
                        poller.poll(5)
            elapsed = time.perf_counter() - start
            time.sleep(0.05)
            frames = ns.tap_stats()["rx"]["packets"] - before["rx"]["packets"]
            return {"frames": frames, "elapsed": elapsed, "extra": ""}
        frame = GUEST_MAC + PEER_MAC + struct.pack("!H", ETH_P_TEST) + bytes(size - 14)
        sender = _sender(ns, frame, seconds)
        iov = [hdr, bytearray(1526)]
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        got = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(64):
                try:
                    os.readv(fd, iov)
                    got += 1
                except BlockingIOError:
                    poller.poll(5)
                    break
        elapsed = time.perf_counter() - start
        offered = int(sender.communicate(timeout=seconds + 30)[0])
        drops = ns.tap_stats()["tx"]["dropped"] - before["tx"]["dropped"]
        return {"frames": got, "elapsed": elapsed,
                "extra": f"offered {offered / elapsed / 1000:.0f} kpps, tap drops {drops}"}
    finally:
        tap.close()


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
                for path, run in (("user space", one_run), ("raw tap", raw_run)):
                    res = run(ns, direction, size, args.seconds)
                    pps = res["frames"] / res["elapsed"]
                    rows.append((path, direction, size, pps, pps * size * 8 / 1e6, res["extra"]))
    finally:
        ns.close()
    print(f"virtio-net through a tap, {args.seconds:g} s per run, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'data path':<12} {'dir':<4} {'frame':>6} {'kpps':>8} {'Mbit/s':>8} {'vs raw':>7}  notes")
    raw = {(d, sz): pps for path, d, sz, pps, _m, _e in rows if path == "raw tap"}
    for path, direction, size, pps, mbit, extra in rows:
        ratio = f"{pps / raw[(direction, size)]:.2f}" if path != "raw tap" else "-"
        print(f"{path:<12} {direction:<4} {size:>5}B {pps / 1000:>8.1f} {mbit:>8.1f} {ratio:>7}  {extra}")
    print(f"{'vhost-net':<12} {'-':<4} {'-':>6} {'-':>8} {'-':>8} {'-':>7}  {unavailable_reason()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
