#!/usr/bin/env python3
"""virtio-blk throughput benchmark: the VMM's own block data path against raw host file I/O.

The device side is the real thing minus KVM: a VirtioBlk behind a VirtioMmio transport with its
I/O thread, driven through guest memory by the test driver (fill the ring with ``--depth``
requests, notify through QueueNotify, wait on the interrupt eventfd, collect the used ring).
The raw side issues the same operations with os.pread/os.pwrite on the same file, opened the
same way (buffered, or O_DIRECT with an aligned buffer), one at a time. The ratio column is
device / raw: the cost of the virtio layer in Python on top of the host syscall.

Cases: 4 KiB random reads and writes, 1 MiB sequential reads and writes, each buffered and
O_DIRECT. Buffered reads are served from the page cache (the file was just written), so they
measure the data path rather than the disk. Writes are not flushed. Each measurement runs for
``--seconds`` (default 2), so the whole run stays under about a minute.

    python bench/blk_throughput.py
    python bench/blk_throughput.py --dir /var/tmp --size-mib 512 --seconds 3
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import sys
import tempfile
import time

from pystratovirt.memory.guest import GuestMemory
from pystratovirt.virtio.blk import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BackendError,
    FileBackend,
    VirtioBlk,
)
from pystratovirt.virtio.mmio import VirtioMmio
from pystratovirt.virtio.mock_driver import BLK_HEADER, BlkDriver

KiB, MiB = 1 << 10, 1 << 20
CASES = [  # name, block size, random?, write?
    ("4k-randread", 4 * KiB, True, False),
    ("4k-randwrite", 4 * KiB, True, True),
    ("1m-seqread", MiB, False, False),
    ("1m-seqwrite", MiB, False, True),
]


def offsets(file_size: int, bs: int, rand: bool, seed: int = 1):
    """An endless stream of block-aligned offsets: random, or sequential wrapping at the end."""
    rnd = random.Random(seed)
    blocks = file_size // bs
    pos = 0
    while True:
        if rand:
            yield rnd.randrange(blocks) * bs
        else:
            yield pos * bs
            pos = (pos + 1) % blocks


def run_device(path: str, direct: bool, bs: int, rand: bool, write: bool, depth: int,
               seconds: float, file_size: int) -> tuple[int, float]:
    """Operations completed and elapsed seconds through the virtio-blk device."""
    ring_base, data_base = 0x10_0000, 0x20_0000
    mem = GuestMemory(data_base + depth * (bs + 8 * KiB) + 16 * MiB)
    dev = VirtioBlk(FileBackend.open(path, direct=direct), name="bench")
    transport = VirtioMmio(dev, mem)
    transport.start()
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
            slots.append((hdr, data, status))
        rtype = VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN
        offs = offsets(file_size, bs, rand)
        done = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for hdr, data, status in slots:
                mem.write(hdr, BLK_HEADER.pack(rtype, 0, next(offs) // 512))
                out = [(hdr, 16)] + ([(data, bs)] if write else [])
                inp = ([] if write else [(data, bs)]) + [(status, 1)]
                drv.submit(0, out, inp, publish=False)
            drv.publish(0)
            drv.notify(0)
            drv.wait_used(0, depth, timeout=60)
            for _, _, status in slots:
                if mem.read_u8(status) != VIRTIO_BLK_S_OK:
                    raise RuntimeError("a benchmark request failed")
            done += depth
            now = time.perf_counter()
            if now >= deadline:
                return done, now - start
    finally:
        transport.close(timeout=10)
        mem.close()


def run_raw(path: str, direct: bool, bs: int, rand: bool, write: bool, seconds: float,
            file_size: int) -> tuple[int, float]:
    """Operations completed and elapsed seconds with plain pread/pwrite on the same file."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, bs)  # page-aligned, as O_DIRECT needs
    buf.write(b"\x5a" * bs)
    offs = offsets(file_size, bs, rand)
    done = 0
    try:
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(32):
                if write:
                    os.pwrite(fd, buf, next(offs))
                else:
                    os.preadv(fd, [buf], next(offs))
            done += 32
            now = time.perf_counter()
            if now >= deadline:
                return done, now - start
    finally:
        buf.close()
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
    ap.add_argument("--depth", type=int, default=32, help="requests per notification for 4 KiB cases")
    ap.add_argument("--depth-1m", type=int, default=4, help="requests per notification for 1 MiB cases")
    ap.add_argument("--only", choices=["buffered", "direct"], help="run one mode only")
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="blkbench-", dir=args.dir)
    path = os.path.join(workdir, "disk.img")
    size = args.size_mib * MiB
    try:
        make_file(path, size)
        modes = [m for m in ("buffered", "direct") if args.only in (None, m)]
        rows = []
        for mode in modes:
            direct = mode == "direct"
            if direct:
                try:
                    FileBackend.open(path, direct=True).close()
                except BackendError as exc:
                    print(f"skipping O_DIRECT rows: {exc}", file=sys.stderr)
                    continue
            for name, bs, rand, write in CASES:
                depth = args.depth if bs < MiB else args.depth_1m
                n_dev, t_dev = run_device(path, direct, bs, rand, write, depth, args.seconds, size)
                n_raw, t_raw = run_raw(path, direct, bs, rand, write, args.seconds, size)
                rows.append((name, mode, depth, n_dev / t_dev, n_raw / t_raw, bs))
                print(f"  {name:13s} {mode:8s} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nvirtio-blk data path vs raw pread/pwrite, file {args.size_mib} MiB in {args.dir}, "
          f"{args.seconds:g} s per measurement, Python {sys.version.split()[0]}\n")
    head = (f"{'case':13s} {'mode':8s} {'depth':>5s} {'device IOPS':>12s} {'device MB/s':>12s} "
            f"{'raw IOPS':>10s} {'raw MB/s':>10s} {'ratio':>6s}")
    print(head)
    print("-" * len(head))
    for name, mode, depth, dev_iops, raw_iops, bs in rows:
        print(f"{name:13s} {mode:8s} {depth:5d} {dev_iops:12.0f} {dev_iops * bs / 1e6:12.1f} "
              f"{raw_iops:10.0f} {raw_iops * bs / 1e6:10.1f} {dev_iops / raw_iops:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
