#!/usr/bin/env python3
"""Boot-time benchmark: process start to the guest's ready marker, side by side in one run.

Rows: the probe guest (to its ``ready`` line), and optionally the lean Linux kernel from the
guest kit (to the kernel's ``Run /init`` line) with the bzImage payload extracted on the host
and with the guest's own decompressor. Prints a table; ``--plot FILE`` also writes a bar chart
(needs matplotlib).

    python bench/boot_time.py                 # probe only, 5 runs
    python bench/boot_time.py --linux         # + lean kernel, extracted and not (minutes here)
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time

STRATOVIRT = [sys.executable, "-m", "pystratovirt"]


def time_to_marker(args: list[str], marker: str, timeout: float) -> float:
    """Seconds from spawning the VMM to ``marker`` on its serial console; the VM is then killed."""
    start = time.monotonic()
    proc = subprocess.Popen(STRATOVIRT + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    found = threading.Event()
    buf = bytearray()
    regex = re.compile(marker.encode())

    def pump() -> None:
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                return
            buf.extend(chunk)
            if regex.search(buf):
                found.set()
                return

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    ok = found.wait(timeout)
    elapsed = time.monotonic() - start
    proc.kill()
    proc.wait()
    if not ok:
        raise RuntimeError(f"{marker!r} not seen within {timeout}s; tail: {bytes(buf[-400:])!r}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="probe boots to average (default 5)")
    ap.add_argument("--linux", action="store_true", help="also boot the lean kernel, extracted and not")
    ap.add_argument("--plot", help="write a bar chart to this PNG")
    opts = ap.parse_args()

    from pystratovirt.guest.build import build_probe
    probe = str(build_probe())
    rows = []
    probe_times = [time_to_marker(["-kernel", probe, "-serial", "stdio", "-smp", "2"], r"\nready\r?\n", 60)
                   for _ in range(opts.runs)]
    rows.append(("probe guest, -smp 2", "ELF", statistics.median(probe_times), min(probe_times)))

    if opts.linux:
        from pystratovirt.guest.kit import ensure_lean_guest
        g = ensure_lean_guest()
        base = ["-kernel", str(g.bzimage), "-initrd", str(g.initramfs), "-append", g.cmdline,
                "-smp", "2", "-m", "512M", "-serial", "stdio"]
        for label, extra in (("lean Linux, payload extracted on host", []),
                             ("lean Linux, guest decompressor", ["-machine", "microvm,kernel-extract=off"])):
            t = time_to_marker(base + extra, r"Run /init as init process", 1800)
            rows.append((label, "bzImage", t, t))

    print(f"{'guest':42} {'image':8} {'median s':>9} {'best s':>8}")
    for label, image, med, best in rows:
        print(f"{label:42} {image:8} {med:9.2f} {best:8.2f}")
    if len(rows) == 3:
        print(f"\nextraction speed-up: {rows[2][2] / rows[1][2]:.2f}x")
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
