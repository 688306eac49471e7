#!/usr/bin/env python3
"""Kernel-load benchmark: ``load_kernel`` of a bzImage in a fresh process, with and without the
extracted-payload cache.

Each measurement is a new Python process (as a VMM start is: cold heap, page faults included)
that imports the boot layer, maps 256 MiB of guest memory and times one ``load_kernel`` call.
Rows, interleaved run by run:

* cache off: the payload is decompressed (``PYSTRATOVIRT_PAYLOAD_CACHE=off``);
* cache miss: decompressed and written to an empty cache;
* hit, content hash: the image is read and hashed (SHA-256) to find its entry (the stat index
  is removed before each run);
* hit, stat index: the image's (device, inode, size, mtime, ctime) finds the hash, so only its
  setup header is read.

The phases of the hit path (read, hash, stat index lookup, entry read + CRC) are timed separately
in the same kind of fresh process, which is what decides whether the stat index pays for itself.

    python3 bench/kernel_load.py                       # the lean kernel from the guest kit, 7 runs
    python3 bench/kernel_load.py --kernel /boot/vmlinuz-6.1.0-28-cloud-amd64 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LOAD = r"""
import sys, time
t0 = time.perf_counter()
from pystratovirt.boot import load_kernel
from pystratovirt.memory import GuestMemory
mem = GuestMemory(256 << 20)
t1 = time.perf_counter()
info = load_kernel(mem, sys.argv[1], "console=ttyS0")
t2 = time.perf_counter()
print(f"{(t2 - t1) * 1e3:.3f} {info.kind} || {' | '.join(info.notes)}")
"""

PHASES = r"""
import hashlib, os, sys, time, zlib
from pystratovirt.boot.payload_cache import PayloadCache
kernel, directory = sys.argv[1], sys.argv[2]
cache = PayloadCache(directory)
t = [time.perf_counter()]
fd = os.open(kernel, os.O_RDONLY); st = os.fstat(fd)
digest = cache.digest_for(st); t.append(time.perf_counter())
head = os.pread(fd, 132 << 10, 0); t.append(time.perf_counter())
data = os.pread(fd, st.st_size + 1, 0); t.append(time.perf_counter())
assert hashlib.sha256(data).digest() == digest; t.append(time.perf_counter())
entry = cache.get(digest); t.append(time.perf_counter())
assert entry is not None
print(" ".join(f"{(b - a) * 1e3:.3f}" for a, b in zip(t, t[1:])), len(entry.elf))
"""
PHASE_NAMES = ["stat index lookup (fstat + record)", "read the setup header (132 KiB)",
               "read the whole image", "SHA-256 of the image", "entry: open, read, CRC32"]


def run(code: str, args: list[str], env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"kernel_load: the measuring process failed: {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", help="a bzImage (default: the guest kit's lean kernel)")
    ap.add_argument("--runs", type=int, default=7, help="fresh processes per row (default 7)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be positive")
    kernel = args.kernel
    if kernel is None:
        from pystratovirt.guest.kit import ensure_lean_guest
        kernel = str(ensure_lean_guest().bzimage)
    if not os.path.isfile(kernel):
        ap.error(f"{kernel} is not a file")

    work = Path(tempfile.mkdtemp(prefix="kernel-load-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    cache_dir = work / "cache"
    # The stat index trusts only files whose last change is a few seconds old: use a copy made
    # now, and wait that out, so every row loads the same file.
    image = work / "bzImage"
    shutil.copyfile(kernel, image)
    rows = {"cache off": [], "cache miss (decompress + write)": [], "hit, content hash": [],
            "hit, stat index": []}
    notes = {}
    phases = []
    try:
        run(LOAD, [str(image)], dict(env, PYSTRATOVIRT_PAYLOAD_CACHE="off"))   # warm-up: .pyc files
        time.sleep(2.5)
        for _ in range(args.runs):
            for name in rows:
                if name == "cache off":
                    e = dict(env, PYSTRATOVIRT_PAYLOAD_CACHE="off")
                else:
                    e = dict(env, PYSTRATOVIRT_PAYLOAD_CACHE=str(cache_dir))
                    if name.startswith("cache miss"):
                        shutil.rmtree(cache_dir, ignore_errors=True)
                    elif name == "hit, content hash":
                        shutil.rmtree(cache_dir / "index", ignore_errors=True)
                ms, rest = run(LOAD, [str(image)], e).split(" ", 1)
                rows[name].append(float(ms))
                notes[name] = rest
            out = run(PHASES, [str(image), str(cache_dir)], env).split()
            phases.append([float(x) for x in out[:-1]])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    size = os.path.getsize(kernel)
    print(f"\nload_kernel in a fresh process, {kernel} ({size / (1 << 20):.1f} MiB), {args.runs} runs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}\n")
    print(f"| {'path':32} | median ms | min ms | max ms |")
    print(f"|{'-' * 34}|-----------|--------|--------|")
    for name, values in rows.items():
        print(f"| {name:32} | {statistics.median(values):9.1f} | {min(values):6.1f} | {max(values):6.1f} |")
    print(f"\nhit-path phases (median ms of {args.runs} fresh processes):")
    for i, name in enumerate(PHASE_NAMES):
        print(f"  {name:36} {statistics.median(p[i] for p in phases):7.2f}")
    print()
    for name, text in notes.items():
        print(f"{name}: {text[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
