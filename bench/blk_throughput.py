#!/usr/bin/env python3
"""virtio-blk throughput benchmark: the VMM's own block data path against raw host file I/O.

The device side is the real thing minus KVM: a VirtioBlk behind a VirtioMmio transport with its
I/O thread, in this process. The guest is a driver in a **process of its own** (forked after the
driver initialised the device): guest RAM is a memfd both map (``GuestMemory.shared``), the
driver kicks the queue through the transport's notify eventfd (what KVM's ioeventfd signals on a
QueueNotify write) and sleeps on the interrupt eventfd (what KVM's irqfd would inject), so the
device's thread has this interpreter, and its GIL, to itself, as a guest on its own vCPUs would
leave it. The driver keeps ``--depth`` requests in flight as fio does in a Linux guest: every
pre-built chain (header, data, status) it finds used is checked and re-posted at once, the queue
is kicked only when the device asked for it (EVENT_IDX), and the driver sleeps on the interrupt
only when nothing was used.

The raw side issues the same operations with os.preadv/os.pwritev on the same file, opened the
same way (buffered, or O_DIRECT), one at a time, in one thread, going round as many page-aligned
buffers as the driver has requests in flight (the guest's requests use that many too). The ratio
column is device / raw: the cost of the virtio layer in Python on top of the host system call.

Cases: 4 KiB random reads and writes, 1 MiB sequential reads and writes, each buffered and
O_DIRECT. Buffered reads are served from the page cache (the file was just written), so they
measure the data path rather than the disk. Writes are not flushed. Each measurement runs for
``--seconds`` (default 2); device and raw runs alternate ``--rounds`` times (default 1) and the
best of each is kept, so a burst of load from another process on this shared host does not
decide a row.

Two guest drivers: ``irq`` sleeps on the interrupt whenever nothing is used, as Linux's
virtio-blk does by default; ``poll`` watches the used ring and never asks for an interrupt, as
Linux's polled queues (``virtio_blk.poll_queues``, io_uring with IOPOLL) do. On this project's
nested host an interrupt (an eventfd write waking a sleeping process) costs the device's thread
~50 us, so the irq rows measure the wake-ups as much as the device; the poll rows measure the
device.

    python3 bench/blk_throughput.py
    python3 bench/blk_throughput.py --dir /var/tmp --size-mib 512 --seconds 3 --rounds 3
    python3 bench/blk_throughput.py --profile 4k-randread    # py-spy/cProfile target: device side only
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's package

from pystratovirt.memory.guest import GuestMemory  # noqa: E402
from pystratovirt.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlk  # noqa: E402
from pystratovirt.virtio.block_backend import BackendError, DriveConfig, FileBackend  # noqa: E402
from pystratovirt.virtio.mmio import IO_POLL, VirtioMmio  # noqa: E402
from pystratovirt.virtio.mock_driver import BLK_HEADER, BlkDriver, BulkRing, DriverProcess  # noqa: E402
from pystratovirt.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
CASES = [  # name, block size, random?, write?
    ("4k-randread", 4 * KiB, True, False),
    ("4k-randwrite", 4 * KiB, True, True),
    ("1m-seqread", MiB, False, False),
    ("1m-seqwrite", MiB, False, True),
]
_DESC = struct.Struct("<QIHH")
_U64 = struct.Struct("<Q")


def offsets(file_size: int, bs: int, rand: bool, count: int = 1 << 16, seed: int = 1) -> list[int]:
    """A cycle of block-aligned offsets: random, or sequential wrapping at the end."""
    rnd = random.Random(seed)
    blocks = file_size // bs
    if rand:
        return [rnd.randrange(blocks) * bs for _ in range(count)]
    return [(i % blocks) * bs for i in range(min(count, blocks))]


def open_backend(path: str, direct: bool) -> FileBackend:
    return FileBackend.open(DriveConfig(id="bench", path=path, direct=direct))


# -- the guest: a driver process -------------------------------------------------------------------
def _drive(mem: GuestMemory, drv: BlkDriver, slots: list[tuple[int, tuple[int, int], int]], write: bool,
           sectors: list[int], seconds: float, notify_fd: int, irq_fd: int, report_fd: int,
           polling: bool = False) -> None:
    """The driver loop, in the forked child, as fio with ``iodepth=len(slots)`` on a Linux guest
    keeps it: every used request is checked and re-posted at once (slot i is always descriptors
    3i..3i+2: header, data, status), the queue is kicked only when the device asked to be
    (EVENT_IDX's avail_event), and the driver sleeps on the interrupt only when nothing was used.
    What the device returned is taken in bulk (one read of the used elements, one write of the
    available entries), so the driver costs less per request than the device and the figure is
    the device's. ``polling``: never sleep and never ask for an interrupt (Linux's polled block
    queues, ``virtio_blk.poll_queues``): the used ring is watched instead. Writes
    "<requests> <elapsed>" to ``report_fd`` after ``seconds``."""
    ram = mem.view(0, mem.regions[0].size)   # region 0 starts at guest address 0
    ring = BulkRing(drv.queues[0], ram, mem.host_view_u16(), notify_fd, irq_fd)
    q, depth = drv.queues[0], len(slots)
    rtype = VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN
    data_flags = VIRTQ_DESC_F_NEXT | (0 if write else VIRTQ_DESC_F_WRITE)
    for i, (hdr, (data, bs), status) in enumerate(slots):
        _DESC.pack_into(ram, q.desc + 16 * (3 * i), hdr, 16, VIRTQ_DESC_F_NEXT, 3 * i + 1)
        _DESC.pack_into(ram, q.desc + 16 * (3 * i + 1), data, bs, data_flags, 3 * i + 2)
        _DESC.pack_into(ram, q.desc + 16 * (3 * i + 2), status, 1, VIRTQ_DESC_F_WRITE, 0)
        BLK_HEADER.pack_into(ram, hdr, rtype, 0, 0)
    sector_at = [hdr + 8 for hdr, _data, _status in slots]
    status_at = [status for _hdr, _data, status in slots]
    n_sectors = len(sectors)
    pos = done = 0

    def post(batch: list[int]) -> None:
        """Give these slots new sectors and make them available."""
        nonlocal pos
        for slot in batch:
            _U64.pack_into(ram, sector_at[slot], sectors[pos])
            pos = pos + 1 if pos + 1 < n_sectors else 0
            ram[status_at[slot]] = 0xFF
        ring.post([3 * slot for slot in batch])

    post(list(range(depth)))
    start = time.perf_counter()
    deadline = start + seconds
    os.eventfd_write(notify_fd, 1)
    while True:
        heads = ring.take_used()
        if not heads:
            if not polling:
                ring.sleep(1000)
            continue
        batch = [head // 3 for head in heads]
        for slot in batch:
            if ram[status_at[slot]] != VIRTIO_BLK_S_OK:
                os.write(report_fd, b"error a request failed\n")
                return
        done += len(batch)
        old = ring.avail_idx
        post(batch)
        ring.kick_if_asked(old)
        now = time.perf_counter()
        if now >= deadline:
            os.write(report_fd, f"{done} {now - start}\n".encode())
            return


def run_device(path: str, direct: bool, bs: int, rand: bool, write: bool, depth: int,
               seconds: float, file_size: int, polling: bool = False) -> tuple[int, float]:
    """Requests completed and elapsed seconds through the virtio-blk device, the driver being
    another process."""
    ring_base, data_base = 0x10_0000, 0x20_0000
    size = (data_base + depth * (bs + 8 * KiB) + 16 * MiB + MiB - 1) & ~(MiB - 1)
    mem = GuestMemory.shared(size)
    dev = VirtioBlk(open_backend(path, direct), name="bench")
    transport = VirtioMmio(dev, mem)
    try:
        drv = BlkDriver(transport, mem, ring_base=ring_base, data_base=data_base,
                        data_size=mem.size - data_base)
        drv.initialize()
        slots = []
        for _ in range(depth):
            hdr = drv.alloc(16, 16)
            data = drv.alloc(bs, 4096)  # guest page-aligned, as Linux's page-cache I/O is
            status = drv.alloc(1, 1)
            mem.fill(data, bs, 0x5A)
            slots.append((hdr, (data, bs), status))
        sectors = [off >> 9 for off in offsets(file_size, bs, rand)]
        (notify_fd, _), = transport.notify_eventfds()
        driver = DriverProcess(lambda report_fd: _drive(mem, drv, slots, write, sectors, seconds, notify_fd,
                                                        transport.irq_eventfd, report_fd, polling))
        transport.start()
        return driver.result()
    finally:
        transport.close(timeout=10)
        mem.close()


def run_raw(path: str, direct: bool, bs: int, rand: bool, write: bool, depth: int, seconds: float,
            file_size: int) -> tuple[int, float]:
    """Operations completed and elapsed seconds with plain pread/pwrite on the same file, one at
    a time, going round ``depth`` page-aligned buffers as the guest's requests do."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    area = mmap.mmap(-1, bs * depth)  # page-aligned, as O_DIRECT needs
    area.write(b"\x5a" * (bs * depth))
    whole = memoryview(area)
    bufs = [[whole[i * bs:(i + 1) * bs]] for i in range(depth)]
    offs = offsets(file_size, bs, rand)
    n_offs = len(offs)
    done = pos = 0
    op = os.pwritev if write else os.preadv
    try:
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for buf in bufs:
                op(fd, buf, offs[pos])
                pos = pos + 1 if pos + 1 < n_offs else 0
            done += depth
            now = time.perf_counter()
            if now >= deadline:
                return done, now - start
    finally:
        buf = bufs = None
        whole.release()
        area.close()
        os.close(fd)


def make_file(path: str, size: int) -> None:
    chunk = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp", help="where to create the test file (default /var/tmp; "
                    "O_DIRECT rows are skipped if its filesystem lacks O_DIRECT)")
    ap.add_argument("--size-mib", type=int, default=256, help="test file size (default 256 MiB)")
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement (default 2)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating device/raw measurements per "
                    "row, best kept (default 1)")
    ap.add_argument("--depth", type=int, default=32, help="requests in flight for 4 KiB cases (default 32)")
    ap.add_argument("--depth-1m", type=int, default=4, help="requests in flight for 1 MiB cases (default 4)")
    ap.add_argument("--only", choices=["buffered", "direct"], help="run one mode only")
    ap.add_argument("--case", choices=[c[0] for c in CASES], action="append",
                    help="run only these cases (repeatable)")
    ap.add_argument("--driver", choices=["irq", "poll", "both"], default="both",
                    help="the guest driver: interrupt-driven (Linux's default), polled (Linux's "
                    "poll_queues), or both (default)")
    ap.add_argument("--profile", metavar="CASE", choices=[c[0] for c in CASES],
                    help="run the device side of one case for --seconds and nothing else "
                    "(for py-spy record -- python3 bench/blk_throughput.py --profile ...)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    drivers = {"irq": [False], "poll": [True], "both": [False, True]}[args.driver]

    workdir = tempfile.mkdtemp(prefix="blkbench-", dir=args.dir)
    path = os.path.join(workdir, "disk.img")
    size = args.size_mib * MiB
    rows = []
    try:
        make_file(path, size)
        if args.profile:
            name, bs, rand, write = next(c for c in CASES if c[0] == args.profile)
            n, t = run_device(path, args.only == "direct", bs, rand, write,
                              args.depth if bs < MiB else args.depth_1m, args.seconds, size,
                              polling=args.driver == "poll")
            print(f"{name}: {n / t:.0f} requests/s through the device")
            return 0
        modes = [m for m in ("buffered", "direct") if args.only in (None, m)]
        for mode in modes:
            direct = mode == "direct"
            if direct:
                try:
                    open_backend(path, True).close()
                except BackendError as exc:
                    print(f"skipping O_DIRECT rows: {exc}", file=sys.stderr)
                    continue
            for name, bs, rand, write in CASES:
                if args.case and name not in args.case:
                    continue
                depth = args.depth if bs < MiB else args.depth_1m
                best = {polling: 0.0 for polling in drivers}
                raw_best = 0.0
                for _ in range(max(1, args.rounds)):
                    for polling in drivers:
                        n_dev, t_dev = run_device(path, direct, bs, rand, write, depth, args.seconds,
                                                  size, polling)
                        best[polling] = max(best[polling], n_dev / t_dev)
                    n_raw, t_raw = run_raw(path, direct, bs, rand, write, depth, args.seconds, size)
                    raw_best = max(raw_best, n_raw / t_raw)
                rows.append((name, mode, depth, best, raw_best, bs))
                print(f"  {name:13s} {mode:8s} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nvirtio-blk data path (driver in its own process) vs raw preadv/pwritev, file "
          f"{args.size_mib} MiB in {args.dir}, {args.seconds:g} s per measurement, best of "
          f"{max(1, args.rounds)}, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.2f}, device I/O thread polls "
          f"{IO_POLL * 1e6:.0f} us before it sleeps\n")
    labels = {False: "irq driver", True: "polled driver"}
    head = f"{'case':13s} {'mode':8s} {'depth':>5s} "
    head += " ".join(f"{labels[p] + ' IOPS':>18s}" for p in drivers)
    head += f" {'raw IOPS':>10s} " + " ".join(f"{'ratio ' + labels[p].split()[0]:>12s}" for p in drivers)
    head += f" {'MB/s (best)':>12s}"
    print(head)
    print("-" * len(head))
    for name, mode, depth, best, raw_iops, bs in rows:
        line = f"{name:13s} {mode:8s} {depth:5d} "
        line += " ".join(f"{best[p]:18.0f}" for p in drivers)
        line += f" {raw_iops:10.0f} " + " ".join(f"{best[p] / raw_iops:12.2f}" for p in drivers)
        line += f" {max(best.values()) * bs / 1e6:12.1f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
