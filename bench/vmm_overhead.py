#!/usr/bin/env python3
"""VMM overhead benchmark: pystratovirt against QEMU's microvm, side by side in one run.

Both VMMs get the same lean bzImage from the guest kit, 256 MiB of RAM and a QMP unix socket,
and are started frozen (``-S``). QEMU 7.2 runs as ``-M microvm -enable-kvm -cpu kvm64,-cx16
-nodefaults``. Per run and per VMM, in one process lifetime:

* start: process spawn -> greeting, ``qmp_capabilities`` and the first ``query-status`` answered
  (the socket is polled every 0.5 ms until it accepts; QEMU needs the capabilities handshake
  before any command, so both get it);
* RSS: ``VmRSS`` of the VMM right after that answer, and the same minus the pages of the guest
  RAM mapping (``/proc/PID/smaps``: the anonymous mapping of exactly the guest RAM size);
* QMP round trip: ``--rtt`` sequential ``query-status`` calls, p50 and p99, with the client and
  every VMM thread on one CPU (``--rtt-cpu``; across CPUs a wake-up costs ~60 us more here);
* pipelined: ``--pipelined`` ``query-status`` commands written in one go (by a writer thread)
  while the replies are read; commands answered per second.

Then "VMM overhead with a booted guest": RSS minus the guest RAM mapping's resident pages, with a
guest that has run. pystratovirt boots the probe guest (``-smp 1``) to its ``ready`` line. QEMU
cannot load the probe guest ("Error loading uncompressed kernel without PVH ELF Note") and, on a
host whose KVM emulates guest ring 0 (PVM), cannot boot Linux either: it runs the lean kernel
(with the same guest command line pystratovirt would give it there) until KVM stops it with an
internal error at the first instruction the emulator lacks (the kernel's first ``int3``, ~6 s
into its boot; pystratovirt finishes those itself), or until ``Run /init`` on a host where it can;
the table's note says which state it reached. The two guests differ, so only the overhead
(RSS minus guest pages) gets a ratio.

Runs are interleaved (A, B, A, B, ...) after one untimed warm-up start of each, and every figure is
reported as min / median / max with the ratio of the medians (pystratovirt / QEMU). QEMU rows are
skipped with a note when ``qemu-system-x86_64`` is not installed. ``--png FILE`` draws a chart if
matplotlib is installed (``pip install -e '.[bench]'``); the table is printed either way.

    python3 bench/vmm_overhead.py                     # 5 runs, both VMMs, booted-guest rows
    python3 bench/vmm_overhead.py --runs 9 --png vmm.png
    python3 bench/vmm_overhead.py --no-booted          # frozen figures only (faster)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's package, also for the VMM child (PYTHONPATH below)

MiB = 1 << 20
QEMU = "qemu-system-x86_64"
QEMU_MACHINE = ["-M", "microvm", "-enable-kvm", "-cpu", "kvm64,-cx16", "-nodefaults"]
PSTV, QEMU_NAME = "pystratovirt", "QEMU microvm"
POLL = 0.0005


class BenchError(Exception):
    """A VMM did not behave as the benchmark needs; the message says how."""


# -- a minimal QMP client ------------------------------------------------------------------------
class QmpClient:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def line(self) -> bytes:
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                out = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                return out
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise BenchError("the VMM closed the QMP connection")
            self.buf += chunk

    def reply(self) -> dict:
        """The next message that is not an event."""
        while True:
            msg = json.loads(self.line())
            if "event" not in msg:
                return msg

    def execute(self, command: str) -> dict:
        self.sock.sendall(b'{"execute":"%s"}\n' % command.encode())
        msg = self.reply()
        if "return" not in msg:
            raise BenchError(f"{command} failed: {msg}")
        return msg["return"]

    def close(self) -> None:
        self.sock.close()


def connect_when_ready(path: str, proc: subprocess.Popen, timeout: float, errlog: Path) -> socket.socket:
    """Connect as soon as the VMM's QMP socket accepts (polling, so the start figure is not rounded up)."""
    deadline = time.perf_counter() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(timeout)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if proc.poll() is not None:
            raise BenchError(f"the VMM exited with code {proc.returncode} before QMP answered: "
                             f"{errlog.read_text(errors='replace').strip()[-400:]}")
        if time.perf_counter() > deadline:
            raise BenchError(f"QMP socket {path} not accepting after {timeout} s")
        time.sleep(POLL)


# -- /proc ---------------------------------------------------------------------------------------
def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$")


def guest_ram_rss(pid: int, ram_bytes: int) -> int:
    """Resident bytes of the guest RAM mapping(s): anonymous mappings of exactly ``ram_bytes``."""
    total, found, current = 0, False, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _MAPPING.match(line)
            if m:
                size = int(m[2], 16) - int(m[1], 16)
                current = size == ram_bytes and not m[3]
                continue
            if current and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
                found = True
    if not found:
        raise BenchError(f"no anonymous mapping of {ram_bytes // MiB} MiB (the guest RAM) in "
                         f"/proc/{pid}/smaps")
    return total


# -- the two VMMs --------------------------------------------------------------------------------
@dataclass
class Vmm:
    name: str
    env: dict | None = None

    def frozen_argv(self, kernel: str, cmdline: str, mem_mib: int, sock: str) -> list[str]:
        raise NotImplementedError

    def booted_argv(self, guest: Guests, mem_mib: int, sock: str) -> list[str]:
        raise NotImplementedError


class Pystratovirt(Vmm):
    def __init__(self, pycache: Path | None, payload_cache: Path | None, name: str = PSTV) -> None:
        """``pycache``: where the child keeps its .pyc files (as an installed package has them);
        None compiles every module from source at every start (PYTHONDONTWRITEBYTECODE).
        ``payload_cache``: the extracted-payload cache directory, private to this run (the warm-up
        start fills it); None turns the cache off."""
        env = dict(os.environ)
        env["PYSTRATOVIRT_PAYLOAD_CACHE"] = str(payload_cache) if payload_cache else "off"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if pycache is None:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            env.pop("PYTHONPYCACHEPREFIX", None)
        else:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(pycache)
        super().__init__(name, env)

    def frozen_argv(self, kernel, cmdline, mem_mib, sock):
        return [sys.executable, "-m", "pystratovirt", "-kernel", kernel, "-append", cmdline,
                "-m", f"{mem_mib}M", "-api-channel", f"unix:{sock}", "-S"]

    def booted_argv(self, guest, mem_mib, sock):
        return [sys.executable, "-m", "pystratovirt", "-kernel", guest.probe, "-append", "console=ttyS0",
                "-m", f"{mem_mib}M", "-serial", "stdio", "-api-channel", f"unix:{sock}"]


class Qemu(Vmm):
    def __init__(self, binary: str) -> None:
        super().__init__(QEMU_NAME)
        self.binary = binary

    def frozen_argv(self, kernel, cmdline, mem_mib, sock):
        return [self.binary, *QEMU_MACHINE, "-m", f"{mem_mib}M", "-kernel", kernel, "-append", cmdline,
                "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off", "-S"]

    def booted_argv(self, guest, mem_mib, sock):
        return [self.binary, *QEMU_MACHINE, "-m", f"{mem_mib}M", "-kernel", guest.bzimage,
                "-append", guest.qemu_cmdline, "-display", "none", "-serial", "stdio",
                "-qmp", f"unix:{sock},server=on,wait=off"]


@dataclass
class Guests:
    bzimage: str
    cmdline: str
    qemu_cmdline: str      # + what pystratovirt appends on a ring-0-emulating host
    probe: str


def find_guests() -> Guests:
    from pystratovirt.cpu import pvm
    from pystratovirt.guest.build import build_probe
    from pystratovirt.guest.kit import ensure_lean_guest
    lean = ensure_lean_guest()   # cached in ~/.cache/pystratovirt; the first call builds it (minutes)
    extra = f" {pvm.guest_cmdline_options()}" if pvm.detect() else ""
    return Guests(bzimage=str(lean.bzimage), cmdline=lean.cmdline, qemu_cmdline=lean.cmdline + extra,
                  probe=str(build_probe()))


# -- one VMM process -----------------------------------------------------------------------------
class Running:
    """A spawned VMM with its stderr in a file and, optionally, its console collected."""

    def __init__(self, vmm: Vmm, argv: list[str], workdir: Path, console: bool):
        self.errlog = workdir / f"{vmm.name.split()[0]}.stderr"
        self.err = open(self.errlog, "wb")
        self.console = bytearray()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=vmm.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if console else subprocess.DEVNULL,
                                     stderr=self.err)
        self.pump = None
        if console:
            self.pump = threading.Thread(target=self._pump, daemon=True)
            self.pump.start()

    def _pump(self) -> None:
        while chunk := self.proc.stdout.read1(1 << 16):
            self.console += chunk

    def wait_console(self, regex: bytes, timeout: float) -> bool:
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern.search(self.console):
                return True
            if self.proc.poll() is not None:
                return bool(pattern.search(self.console))
            time.sleep(0.05)
        return False

    def stop(self, qmp: QmpClient | None) -> None:
        try:
            if qmp is not None:
                try:   # wait for the reply: QEMU drops a quit whose connection closes first
                    qmp.sock.settimeout(10)
                    qmp.execute("quit")
                except (OSError, BenchError, ValueError):
                    pass
                qmp.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.pump is not None:
                self.pump.join(timeout=5)
            self.err.close()


# -- measurements --------------------------------------------------------------------------------
@contextlib.contextmanager
def same_cpu(pid: int, cpu: int):
    """Pin this process and every thread of ``pid`` to ``cpu`` (if >= 0) for the block, then undo.

    A round trip between two processes on different CPUs costs a cross-CPU wake-up, which on this
    nested host is ~85 us against ~25 us on one CPU; where the scheduler puts the two decides
    which one a run measures, so the round trip is measured on one CPU for both VMMs.
    """
    if cpu < 0:
        yield
        return
    mine = os.sched_getaffinity(0)
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    theirs = {}
    try:
        os.sched_setaffinity(0, {cpu})
        for tid in tids:
            try:
                theirs[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {cpu})
            except ProcessLookupError:
                pass
        yield
    finally:
        os.sched_setaffinity(0, mine)
        for tid, mask in theirs.items():
            try:
                os.sched_setaffinity(tid, mask)
            except ProcessLookupError:
                pass


def pipelined_rate(qmp: QmpClient, count: int) -> float:
    payload = b'{"execute":"query-status"}\n' * count
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            qmp.sock.sendall(payload)
        except BaseException as exc:  # reported by the reader side
            failure.append(exc)

    start = time.perf_counter()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    for _ in range(count):
        msg = qmp.reply()
        if "return" not in msg:
            raise BenchError(f"pipelined query-status failed: {msg}")
    elapsed = time.perf_counter() - start
    t.join()
    if failure:
        raise BenchError(f"writing the pipelined commands failed: {failure[0]}")
    return count / elapsed


def frozen_run(vmm: Vmm, guests: Guests, args, workdir: Path) -> dict[str, float]:
    sock = str(workdir / "qmp.sock")
    argv = vmm.frozen_argv(guests.bzimage, guests.cmdline, args.mem_mib, sock)
    run = Running(vmm, argv, workdir, console=False)
    qmp = None
    try:
        qmp = QmpClient(connect_when_ready(sock, run.proc, 60, run.errlog))
        qmp.line()                                   # greeting
        qmp.execute("qmp_capabilities")
        status = qmp.execute("query-status")
        start = time.perf_counter() - run.t0
        rss = vm_rss(run.proc.pid)
        guest = guest_ram_rss(run.proc.pid, args.mem_mib * MiB)
        if status.get("running"):
            raise BenchError(f"{vmm.name} was started with -S but reports {status}")
        with same_cpu(run.proc.pid, args.rtt_cpu):
            for _ in range(50):                      # warm the path before timing it
                qmp.execute("query-status")
            rtts = []
            for _ in range(args.rtt):
                t = time.perf_counter()
                qmp.execute("query-status")
                rtts.append(time.perf_counter() - t)
        rtts.sort()
        rate = pipelined_rate(qmp, args.pipelined)
        return {"start_ms": start * 1e3, "rss_mib": rss / MiB, "rss_nonguest_mib": (rss - guest) / MiB,
                "rtt_p50_us": rtts[len(rtts) // 2] * 1e6,
                "rtt_p99_us": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6,
                "pipelined_per_s": rate}
    finally:
        run.stop(qmp)
        _unlink(sock)


def booted_run(vmm: Vmm, guests: Guests, args, workdir: Path, notes: dict) -> dict[str, float]:
    sock = str(workdir / "qmp.sock")
    run = Running(vmm, vmm.booted_argv(guests, args.mem_mib, sock), workdir, console=True)
    qmp = None
    try:
        qmp = QmpClient(connect_when_ready(sock, run.proc, 60, run.errlog))
        qmp.line()
        qmp.execute("qmp_capabilities")
        if isinstance(vmm, Pystratovirt):
            if not run.wait_console(rb"\nready\r?\n", args.boot_timeout):
                raise BenchError(f"the probe guest did not print 'ready' within {args.boot_timeout} s; "
                                 f"console tail {bytes(run.console[-300:])!r}")
            state = "probe guest at 'ready'"
        else:
            deadline = time.monotonic() + args.boot_timeout
            while True:
                status = qmp.execute("query-status")["status"]
                if status != "running":
                    state = f"lean Linux stopped by KVM ({status})"
                    break
                if b"Run /init" in run.console:
                    state = "lean Linux at 'Run /init'"
                    break
                if time.monotonic() > deadline:
                    state = f"lean Linux still running after {args.boot_timeout:.0f} s"
                    break
                time.sleep(0.25)
            lines = [ln for ln in bytes(run.console).decode(errors="replace").splitlines() if ln.strip()]
            if lines:   # without the printk timestamp, so the runs' notes merge
                last = re.sub(r"^\[\s*[0-9.]+\]\s*", "", lines[-1].strip())
                state += f"; last console line: {last[:70]!r}"
        notes.setdefault(vmm.name, set()).add(state)
        rss = vm_rss(run.proc.pid)
        guest = guest_ram_rss(run.proc.pid, args.mem_mib * MiB)
        return {"booted_rss_mib": rss / MiB, "booted_guest_mib": guest / MiB,
                "booted_overhead_mib": (rss - guest) / MiB}
    finally:
        run.stop(qmp)
        _unlink(sock)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- report --------------------------------------------------------------------------------------
# key, label, unit, higher is better
FIGURES = [
    ("start_ms", "process start -> first query-status answered", "ms", False),
    ("rss_mib", "VMM RSS right after that", "MiB", False),
    ("rss_nonguest_mib", "  the same minus guest RAM pages", "MiB", False),
    ("rtt_p50_us", "QMP round trip, p50", "us", False),
    ("rtt_p99_us", "QMP round trip, p99", "us", False),
    ("pipelined_per_s", "pipelined query-status answered", "/s", True),
    ("booted_rss_mib", "booted guest: VMM RSS", "MiB", False),
    ("booted_guest_mib", "booted guest: guest RAM pages resident", "MiB", False),
    ("booted_overhead_mib", "booted guest: VMM overhead (RSS - guest pages)", "MiB", False),
]
NO_RATIO = {"booted_rss_mib", "booted_guest_mib"}   # different guests: only the overhead compares


def fmt(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}"
    if unit in ("us", "ms") and value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def spread(values: list[float], unit: str) -> str:
    return (f"{fmt(statistics.median(values), unit)} "
            f"({fmt(min(values), unit)}-{fmt(max(values), unit)})")


def ratio_text(a: list[float], b: list[float], higher_better: bool) -> str:
    ma, mb = statistics.median(a), statistics.median(b)
    if mb == 0:
        return "-"
    r = ma / mb
    better = r > 1 if higher_better else r < 1
    return f"{r:.2f} ({'better' if better else 'worse' if r != 1 else 'same'})"


def table(results: dict[str, dict[str, list[float]]], vmms: list[str]) -> list[str]:
    ours = [v for v in vmms if v != QEMU_NAME]
    qemu = QEMU_NAME in vmms
    cols = ["figure", "unit"] + [f"{v} median (min-max)" for v in vmms]
    if qemu:
        cols += ["ratio" if len(ours) == 1 else f"ratio, {v}" for v in ours]
    rows = []
    for key, label, unit, higher in FIGURES:
        if not all(results[v].get(key) for v in vmms):
            continue
        row = [label, unit] + [spread(results[v][key], unit) for v in vmms]
        if qemu:
            row += ["-" if key in NO_RATIO else ratio_text(results[v][key], results[QEMU_NAME][key], higher)
                    for v in ours]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return out


def chart(results: dict[str, dict[str, list[float]]], vmms: list[str], path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e '.[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [f for f in FIGURES if all(results[v].get(f[0]) for v in vmms)]
    cols = 3
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, label, unit, higher) in zip(axes.flat, shown, strict=False):  # the grid may have spare cells
        med = [statistics.median(results[v][key]) for v in vmms]
        lo = [m - min(results[v][key]) for m, v in zip(med, vmms, strict=True)]
        hi = [max(results[v][key]) - m for m, v in zip(med, vmms, strict=True)]
        ours = iter(["tab:blue", "tab:cyan", "tab:green"])
        colours = ["tab:orange" if v == QEMU_NAME else next(ours) for v in vmms]
        ax.bar([v.replace(", ", "\n") for v in vmms], med, yerr=[lo, hi], capsize=4, color=colours)
        ax.set_title(label.strip() + (" (higher is better)" if higher else ""), fontsize=8)
        ax.set_ylabel(unit)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("pystratovirt vs QEMU microvm: median, bars min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


# -- main ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="interleaved runs per VMM (default 5)")
    ap.add_argument("--mem-mib", type=int, default=256, help="guest RAM (default 256)")
    ap.add_argument("--rtt", type=int, default=2000, help="sequential query-status calls per run (default 2000)")
    ap.add_argument("--rtt-cpu", type=int, default=0,
                    help="CPU that the client and all VMM threads share while round trips are timed "
                    "(default 0; -1 leaves placement to the scheduler)")
    ap.add_argument("--pipelined", type=int, default=10000, help="pipelined query-status per run (default 10000)")
    ap.add_argument("--no-booted", action="store_true", help="skip the booted-guest overhead rows")
    ap.add_argument("--boot-timeout", type=float, default=90.0, help="seconds a booted guest gets (default 90)")
    ap.add_argument("--no-qemu", action="store_true", help="pystratovirt rows only")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="pystratovirt compiles its modules at every start (no .pyc files); by default "
                    "the warm-up start writes them to a private PYTHONPYCACHEPREFIX")
    ap.add_argument("--payload-cache", choices=["on", "off", "both"], default="on",
                    help="pystratovirt's extracted-payload cache (a directory private to the run, "
                    "filled by the warm-up start); 'both' adds a column without it (default on)")
    ap.add_argument("--png", help="write a chart to this PNG (needs matplotlib)")
    args = ap.parse_args()
    if args.runs < 1 or args.rtt < 1 or args.pipelined < 1 or args.mem_mib < 128:
        ap.error("--runs, --rtt and --pipelined must be positive and --mem-mib at least 128")

    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="vmmbench-"))
    pycache = None if args.no_bytecode else workdir / "pycache"
    vmms: list[Vmm] = [Pystratovirt(pycache, None if args.payload_cache == "off" else workdir / "payload")]
    if args.payload_cache == "both":
        vmms.append(Pystratovirt(pycache, None, name=f"{PSTV}, no payload cache"))
    qemu_bin = None if args.no_qemu else shutil.which(QEMU)
    if qemu_bin:
        vmms.append(Qemu(qemu_bin))
        version = subprocess.run([qemu_bin, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    elif not args.no_qemu:
        notes.append(f"QEMU rows skipped: {QEMU} is not installed (apt-get install qemu-system-x86).")
    names = [v.name for v in vmms]
    results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    booted_notes: dict[str, set] = {}

    # A stray VMM would keep cores busy for the other benchmarks: SIGTERM ends the run cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        guests = find_guests()
        for vmm in vmms:
            frozen_run(vmm, guests, args, workdir)     # warm-up: page cache, .pyc files, payload cache
        for i in range(args.runs):
            for vmm in vmms:
                for k, v in frozen_run(vmm, guests, args, workdir).items():
                    results[vmm.name].setdefault(k, []).append(v)
            print(f"  frozen run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)
        if not args.no_booted:
            for i in range(args.runs):
                for vmm in vmms:
                    for k, v in booted_run(vmm, guests, args, workdir, booted_notes).items():
                        results[vmm.name].setdefault(k, []).append(v)
                print(f"  booted run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)
    except BenchError as exc:
        print(f"vmm_overhead: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nVMM overhead, {args.runs} interleaved runs, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    print(f"kernel {guests.bzimage}, {args.mem_mib} MiB, started with -S, QMP on a unix socket; "
          f"pystratovirt {'compiling from source at each start' if args.no_bytecode else 'with .pyc files'}; "
          f"round trips {f'on CPU {args.rtt_cpu}' if args.rtt_cpu >= 0 else 'where the scheduler puts them'}")
    if qemu_bin:
        print(f"QEMU: {version}: {' '.join(QEMU_MACHINE)}")
    print()
    for line in table(results, names):
        print(line)
    print()
    for name, states in booted_notes.items():
        print(f"booted guest, {name}: {'; '.join(sorted(states))}")
    if qemu_bin:
        notes.append("ratio = pystratovirt median / QEMU median; 'better' says which way that points.")
    for note in notes:
        print(note)
    if args.png:
        why = chart(results, names, args.png)
        print(why or f"chart written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
