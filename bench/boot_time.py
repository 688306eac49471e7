#!/usr/bin/env python3
"""Boot-time benchmark: process start to the guest's ready marker, and the VMM's share of it.

Rows: the probe guest (to its ``ready`` line), and optionally the lean Linux kernel from the
guest kit (to the kernel's ``Run /init`` line) with the bzImage payload extracted on the host
(and with ``--decompressor`` also with the guest's own decompressor, minutes more here). For each
boot the VMM runs with ``-D`` and is stopped with SIGTERM at the marker; every vCPU thread then
logs its exits ("vCPU N: X exits handled (IoOut ..., MmioRead ...), Y ms in the VMM handling
them"), which gives the VMM's share: exits handled and the time from KVM_RUN returning to the
exit handled, against the time to the marker. On a host whose KVM emulates guest ring 0 (PVM)
the rest is mostly the emulator's. Prints a table; ``--plot FILE`` also writes a bar chart
(needs matplotlib).

    python3 bench/boot_time.py                 # probe only, 5 runs
    python3 bench/boot_time.py --linux         # + lean kernel to Run /init (~35 s here)
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's package, also for the VMM child (PYTHONPATH below)

STRATOVIRT = [sys.executable, "-m", "pystratovirt"]
_VCPU_LINE = re.compile(r"vCPU (\d+): (\d+) exits handled \(([^)]*)\), ([0-9.]+) ms in the VMM")


def time_to_marker(args: list[str], marker: str, timeout: float) -> tuple[float, dict]:
    """Seconds from spawning the VMM to ``marker`` on its serial console, and the VMM's share
    (exits, ms handling them, exits by kind) from the vCPU threads' log lines after SIGTERM."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    proc = subprocess.Popen(STRATOVIRT + args + ["-D"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    found = threading.Event()
    buf = bytearray()
    err = bytearray()
    regex = re.compile(marker.encode())

    def pump() -> None:
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                return
            buf.extend(chunk)
            if not found.is_set() and regex.search(buf):
                found.set()

    def pump_err() -> None:
        while chunk := proc.stderr.read1(65536):
            err.extend(chunk)

    threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=pump_err, daemon=True)]
    for t in threads:
        t.start()
    ok = found.wait(timeout)
    elapsed = time.monotonic() - start
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for t in threads:
        t.join(5)
    if not ok:
        raise RuntimeError(f"{marker!r} not seen within {timeout}s; tail: {bytes(buf[-400:])!r}")
    share = {"exits": 0, "ms": 0.0, "kinds": {}}
    for m in _VCPU_LINE.finditer(err.decode(errors="replace")):
        share["exits"] += int(m[2])
        share["ms"] += float(m[4])
        for part in filter(None, (p.strip() for p in m[3].split(","))):
            name, _, n = part.rpartition(" ")
            share["kinds"][name] = share["kinds"].get(name, 0) + int(n)
    return elapsed, share


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="probe boots (default 5)")
    ap.add_argument("--linux", action="store_true", help="also boot the lean kernel to Run /init")
    ap.add_argument("--linux-runs", type=int, default=1, help="lean kernel boots (default 1)")
    ap.add_argument("--decompressor", action="store_true",
                    help="with --linux, also boot it through its own decompressor (minutes more)")
    ap.add_argument("--plot", help="write a bar chart to this PNG")
    opts = ap.parse_args()

    from pystratovirt.guest.build import build_probe
    probe = str(build_probe())
    rows = []

    def measure(label: str, image: str, argv: list[str], marker: str, timeout: float, runs: int) -> None:
        results = [time_to_marker(argv, marker, timeout) for _ in range(runs)]
        times = [t for t, _ in results]
        best = min(range(runs), key=lambda i: times[i])
        rows.append((label, image, statistics.median(times), times[best], results[best][1]))

    measure("probe guest, -smp 2", "ELF", ["-kernel", probe, "-serial", "stdio", "-smp", "2"],
            r"\nready\r?\n", 60, opts.runs)
    if opts.linux:
        from pystratovirt.guest.kit import ensure_lean_guest
        g = ensure_lean_guest()
        base = ["-kernel", str(g.bzimage), "-initrd", str(g.initramfs), "-append", g.cmdline,
                "-smp", "2", "-m", "512M", "-serial", "stdio"]
        variants = [("lean Linux, payload extracted on host", [])]
        if opts.decompressor:
            variants.append(("lean Linux, guest decompressor", ["-machine", "microvm,kernel-extract=off"]))
        for label, extra in variants:
            measure(label, "bzImage", base + extra, r"Run /init as init process", 1800, opts.linux_runs)

    print(f"boot time, {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}\n")
    print(f"{'guest':40} {'image':8} {'median s':>9} {'best s':>8} {'exits':>9} {'VMM ms':>8} "
          f"{'VMM share':>9} {'us/exit':>8}  exits by kind (best run)")
    for label, image, med, best, share in rows:
        per = share["ms"] * 1e3 / share["exits"] if share["exits"] else 0.0
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(share["kinds"].items(), key=lambda kv: -kv[1]))
        print(f"{label:40} {image:8} {med:9.2f} {best:8.2f} {share['exits']:9d} {share['ms']:8.1f} "
              f"{share['ms'] / 1e3 / best:9.1%} {per:8.1f}  {kinds}")
    if opts.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.barh([r[0] for r in rows], [r[2] for r in rows])
        ax.set_xlabel("seconds from process start to ready marker")
        fig.tight_layout()
        fig.savefig(opts.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
