#!/usr/bin/env python3
"""Snapshot benchmark: how fast a VM restored from a snapshot runs, and what clones cost.

One template: the probe guest (``--smp``, ``--mem``) that stamps ``--working-set`` MiB of its RAM
with data (a stand-in for a booted guest's page cache and heap), then ``stop`` + ``migrate`` to a
snapshot directory. Then:

* restore times, ``--runs`` restores against as many fresh boots: process start -> QMP answering
  ``query-status`` with ``running`` (and, for a fresh boot, -> the probe's ``ready`` line), and
  hydropper's quickstart figure read from the ``-D`` log: the ``VmConfig`` line to the last
  ``Vcpu`` line (StratoVirt's test wants < 50 ms);
* memory of ``--clones`` VMs restored from the snapshot, each reading its working set, against
  as many fresh boots that stamp theirs: RSS, PSS and the memory file's shared pages, from
  ``/proc/PID/smaps_rollup`` and ``/proc/PID/smaps``.

    python bench/snapshot.py                        # 5 runs, 10 clones, 256 MiB, 64 MiB working set
    python bench/snapshot.py --clones 4 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's package (and its probe), also for the VMM child below

STRATOVIRT = [sys.executable, "-m", "pystratovirt"]
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
AREA = 0x4000000   # guest RAM above the probe's image
MiB = 1 << 20


class Vm:
    """One VMM process with its serial console on a pipe and a QMP socket."""

    def __init__(self, args: list[str], sock: str):
        self.sock = sock
        self.started = time.monotonic()
        self.proc = subprocess.Popen(STRATOVIRT + args + ["-api-channel", f"unix:{sock}"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=CHILD_ENV)
        self.out = bytearray()
        self.last = b""   # what the last wait_for matched
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            with self.cond:
                self.out += chunk
                self.cond.notify_all()

    def wait_for(self, pattern: bytes, timeout: float = 120) -> float:
        """Seconds from process start until ``pattern`` appears on the console (after what was
        already consumed); consumes it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (m := regex.search(self.out)):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{pattern!r} not seen; console tail {bytes(self.out[-300:])!r}")
                self.cond.wait(0.2)
            self.last = m.group(0).strip()
            del self.out[:m.end()]
        return time.monotonic() - self.started

    def command(self, line: str, timeout: float = 300) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        self.wait_for(rb"(?m)^(ok|error: [^\r\n]*)\r?\n", timeout)
        if self.last.startswith(b"error"):
            raise RuntimeError(f"the probe refused {line!r}: {self.last.decode(errors='replace')}")

    def qmp_running(self, timeout: float = 60) -> float:
        """Seconds from process start until QMP answers query-status with status running."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise RuntimeError("QMP socket never answered") from None
                time.sleep(0.002)
        f = s.makefile("rb")
        f.readline()  # greeting
        s.sendall(b'{"execute":"query-status"}')
        reply = json.loads(f.readline())
        elapsed = time.monotonic() - self.started
        s.close()
        if reply.get("return", {}).get("status") != "running":
            raise RuntimeError(f"not running: {reply}")
        return elapsed

    def qmp(self, *commands: tuple[str, dict | None]) -> list[dict]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.sock)
        f = s.makefile("rb")
        f.readline()
        replies = []
        for name, args in commands:
            msg = {"execute": name} | ({"arguments": args} if args else {})
            s.sendall(json.dumps(msg).encode())
            while "event" in (reply := json.loads(f.readline())):
                pass
            replies.append(reply)
        s.close()
        return replies

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def log_figure(path: str) -> float:
    """Hydropper's quickstart figure from a -D log: VmConfig line to the last Vcpu line (s)."""
    start = last = None
    with open(path) as f:
        for line in f:
            # StratoVirt's format: "2026-12-04T15:40:48.102084514: [pid][tid][file: line]:INFO: msg"
            if ":INFO: " not in line:
                continue
            stamp = datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
            if ":INFO: VmConfig" in line and start is None:
                start = stamp
            elif ":INFO: Vcpu" in line:
                last = stamp
    if start is None or last is None:
        raise RuntimeError(f"no VmConfig/Vcpu lines in {path}")
    return last - start


def mapping_shared(pid: int, path: str) -> int:
    """Shared_Clean bytes of the process's mapping of ``path``."""
    wanted, inside, total = os.path.realpath(path), False, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                inside = len(fields) >= 6 and fields[5] == wanted
            elif inside and fields[0] == "Shared_Clean:":
                total += int(fields[1]) * 1024
    return total


def rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            fields = line.split()
            if fields[0].rstrip(":") in ("Rss", "Pss"):
                out[fields[0].rstrip(":")] = int(fields[1]) * 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="restores and fresh boots to time (default 5)")
    ap.add_argument("--clones", type=int, default=10, help="VMs per group in the memory table (default 10)")
    ap.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    ap.add_argument("--smp", type=int, default=2, help="vCPUs (default 2)")
    ap.add_argument("--working-set", type=int, default=64, help="MiB of RAM each guest fills (default 64)")
    opts = ap.parse_args()

    from pystratovirt.guest.build import build_probe
    probe = str(build_probe())
    base = ["-kernel", probe, "-serial", "stdio", "-smp", str(opts.smp), "-m", f"{opts.mem}M"]
    ws = opts.working_set * MiB
    work = tempfile.mkdtemp(prefix="snapbench-")
    try:
        return run(opts, base, ws, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(opts, base: list[str], ws: int, work: str) -> int:
    snap = os.path.join(work, "snap")

    template = Vm(base, os.path.join(work, "t.sock"))
    try:
        template.wait_for(rb"\nready\r?\n")
        template.command(f"touch {AREA:x} {ws:x} stamp")
        started = time.monotonic()
        replies = template.qmp(("stop", None), ("migrate", {"uri": f"file:{snap}"}), ("query-migrate", None))
        save_s = time.monotonic() - started
        info = replies[2]["return"]
    finally:
        template.stop()
    print(f"template: {opts.smp} vCPUs, {opts.mem} MiB, {opts.working_set} MiB working set; "
          f"stop+migrate {save_s * 1000:.0f} ms (query-migrate total-time {info['total-time']} ms), "
          f"memory file {os.stat(os.path.join(snap, 'memory')).st_blocks * 512 / MiB:.1f} MiB allocated "
          f"of {opts.mem} MiB")

    rows = {"restore": ([], [], []), "fresh boot": ([], [], [])}
    for i in range(opts.runs):
        for kind in rows:
            sock, log = os.path.join(work, f"{kind[0]}{i}.sock"), os.path.join(work, f"{kind[0]}{i}.log")
            extra = ["-incoming", f"file:{snap}"] if kind == "restore" else []
            vm = Vm(base + extra + ["-D", log], sock)
            try:
                qmp_s = vm.qmp_running()
                ready = vm.wait_for(rb"\nready\r?\n") if kind == "fresh boot" else None
                # The restored guest answers at once; the fresh one once it printed "ready".
                vm.command("echo x")
                answered = time.monotonic() - vm.started
                rows[kind][0].append(qmp_s)
                rows[kind][1].append(ready if ready is not None else answered)
            finally:
                vm.stop()
            rows[kind][2].append(log_figure(log))
    interpreter = []
    for _ in range(opts.runs):
        started = time.monotonic()
        subprocess.run(STRATOVIRT + ["-version"], capture_output=True, check=True)
        interpreter.append(time.monotonic() - started)
    print()
    print(f"(for scale: 'stratovirt -version', Python start-up and imports, takes "
          f"{statistics.median(interpreter) * 1000:.0f} ms)")
    print(f"{f'start-up (median of {opts.runs})':28} {'QMP running':>12} {'guest answers':>14} "
          f"{'VmConfig->last Vcpu':>20}")
    for kind, (qmp_s, guest_s, figure) in rows.items():
        print(f"{kind:28} {statistics.median(qmp_s) * 1000:10.0f} ms {statistics.median(guest_s) * 1000:12.0f} ms "
              f"{statistics.median(figure) * 1000:18.0f} ms")

    print()
    print(f"{f'memory, {opts.clones} VMs':28} {'RSS total':>12} {'PSS total':>12} {'PSS per VM':>12} "
          f"{'shared from file':>17}")
    for kind in ("restored clones", "fresh boots"):
        vms = []
        try:
            for i in range(opts.clones):
                extra = ["-incoming", f"file:{snap}"] if kind == "restored clones" else []
                vm = Vm(base + extra, os.path.join(work, f"{kind[0]}m{i}.sock"))
                vms.append(vm)
                if kind == "fresh boots":
                    vm.wait_for(rb"\nready\r?\n", 300)
                    vm.command(f"touch {AREA:x} {ws:x} stamp")
                else:
                    vm.command(f"touch {AREA:x} {ws:x} read")
            stats = [rollup(vm.proc.pid) for vm in vms]
            shared = [mapping_shared(vm.proc.pid, os.path.join(snap, "memory")) for vm in vms]
            rss = sum(s["Rss"] for s in stats)
            pss = sum(s["Pss"] for s in stats)
            print(f"{kind:28} {rss / MiB:9.0f} MiB {pss / MiB:9.0f} MiB {pss / len(vms) / MiB:9.1f} MiB "
                  f"{sum(shared) / len(vms) / MiB:11.1f} MiB/VM")
        finally:
            for vm in vms:
                vm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
