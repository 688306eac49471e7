#!/usr/bin/env python3
"""What each kind of VMM thread really calls: the measurement behind the seccomp allow-lists.

Runs whole probe-guest life cycles under ``strace -f -ff`` (one trace file per thread) in a
network namespace of its own (``tests/helpers/lifecycle.py``: boot with a disk, a NIC and a
balloon; guest disk and network I/O; disk and NIC hot-plug and unplug over QMP; balloon
inflate, statistics, deflate; stop/cont; ``quit``), and a second life cycle that ends with
SIGTERM. Each thread names itself when it installs its filter (``prctl(PR_SET_NAME, ...)``, see
``pystratovirt/util/seccomp.py``), so every trace is split there: what a thread called before
that point (interpreter start-up, building the VM) is not its sandbox's business; what it called
after is attributed to its kind (``vcpuN`` -> vcpu, ``virtio-...`` -> io, the main thread ->
control). The table lists, per kind, every system call seen after the split with its count,
``ioctl`` per request number, and marks the ones the policy in
``pystratovirt/machine/seccomp_policy.py`` does not allow.

    python3 bench/syscalls.py                     # seccomp on (the default): proves nothing is killed
    python3 bench/syscalls.py --disable-seccomp   # measure without filters (finds what is missing)
    python3 bench/syscalls.py --keep /tmp/traces  # keep the raw traces

Exit status 1 if any thread was killed by SIGSYS or any call seen is not in the policy.
Needs root (namespaces, taps), /dev/kvm and strace. Takes a few minutes on an emulating host.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from helpers.lifecycle import Lifecycle  # noqa: E402
from helpers.netns import NetNs  # noqa: E402
from pystratovirt.guest.build import build_probe  # noqa: E402
from pystratovirt.kvm import ioctl as kvm_ioctl  # noqa: E402
from pystratovirt.machine.seccomp_policy import POLICY  # noqa: E402
from pystratovirt.util.seccomp import ThreadKind  # noqa: E402
from pystratovirt.virtio import tap as tap_mod  # noqa: E402

_CALL = re.compile(r"^(?:\d+\s+)?([a-z_0-9]+)\((.*)")
_IOCTL = re.compile(r"^ioctl\((0x[0-9a-f]+|\d+), (0x[0-9a-f]+|\d+)")
_NAME = re.compile(r'^prctl\((?:PR_SET_NAME|0xf), "([^"]*)"')
_TERMIOS = {0x5401: "TCGETS", 0x5402: "TCSETS", 0x5403: "TCSETSW", 0x5404: "TCSETSF",
            0x540F: "TIOCGPGRP", 0x5413: "TIOCGWINSZ", 0x541B: "FIONREAD", 0x5421: "FIONBIO"}


def ioctl_names() -> dict[int, str]:
    names = dict(_TERMIOS)
    for mod, prefixes in ((kvm_ioctl, ("KVM_",)), (tap_mod, ("TUN", "SIOC"))):
        for attr in dir(mod):
            value = getattr(mod, attr)
            if attr.startswith(prefixes) and isinstance(value, int) and value > 0xFF:
                names.setdefault(value, attr)
    return names


def kind_of(thread_name: str, is_main: bool) -> str:
    if is_main:
        return ThreadKind.CONTROL.value
    if re.fullmatch(r"vcpu\d+", thread_name):
        return ThreadKind.VCPU.value
    if thread_name.startswith("virtio-"):
        return ThreadKind.IO.value
    return f"other ({thread_name})"


class Traces:
    """Syscall counts per thread kind, gathered from ``strace -ff`` files."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.killed: list[str] = []
        self.threads: collections.Counter = collections.Counter()

    def add_run(self, prefix: Path, vmm_pid: int | None) -> None:
        files = sorted(prefix.parent.glob(prefix.name + ".*"), key=lambda p: int(p.suffix[1:]))
        main_tid = vmm_pid
        if main_tid is None:  # the first process that became the VMM (exec'd python)
            for path in files:
                if "pystratovirt" in path.read_text(errors="replace").split("\n", 1)[0]:
                    main_tid = int(path.suffix[1:])
                    break
        for path in files:
            tid = int(path.suffix[1:])
            self._add_thread(path, tid == main_tid)

    def _add_thread(self, path: Path, is_main: bool) -> None:
        kind = None
        last_call = None
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("+++ killed by SIGSYS"):
                self.killed.append(f"{path.name} ({kind or 'before its filter'}): last call {last_call}")
                continue
            if line.startswith(("---", "+++", "<...")):
                continue
            m = _CALL.match(line)
            if not m:
                continue
            name = m.group(1)
            if kind is None:
                marker = _NAME.match(line)
                if marker:
                    kind = kind_of(marker.group(1), is_main)
                    self.threads[kind] += 1
                    seen = collections.Counter()
                continue
            if name == "seccomp" and "SECCOMP_SET_MODE_FILTER" in line:
                seen.clear()  # loading the filter (no_new_privs, then this) is its last unfiltered act
                continue
            last_call = line[:120]
            if name == "ioctl":
                im = _IOCTL.match(line)
                name = f"ioctl {int(im.group(2), 0):#x}" if im else "ioctl ?"
            seen[name] += 1
        if kind is not None:
            self.counts[kind].update(seen)


def policy_allows(kind: str, call: str) -> bool:
    try:
        rules = POLICY[ThreadKind(kind)]
    except ValueError:
        return False
    if call.startswith("ioctl "):
        request = int(call.split()[1], 16) if call.split()[1] != "?" else -1
        return any(r.syscall == "ioctl" and (not r.args or any(a[0] == 1 and request & a[1] == a[2] for a in r.args))
                   for r in rules)
    return any(r.syscall == call for r in rules)


def run(args) -> int:
    probe = build_probe()
    workroot = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pystratovirt-syscalls-"))
    workroot.mkdir(parents=True, exist_ok=True)
    traces = Traces()
    extra = ["-disable-seccomp"] if args.disable_seccomp else []
    try:
        for scenario in ("quit", "sigterm"):
            wd = workroot / scenario
            shutil.rmtree(wd, ignore_errors=True)
            wd.mkdir()
            prefix_path = wd / "trace"
            strace = ["strace", "-f", "-ff", "-s", "32", "-e", "raw=ioctl", "-o", str(prefix_path)]
            ns = NetNs()
            life = Lifecycle(probe, wd, ns, prefix=strace, extra_args=extra)
            try:
                print(f"[{scenario}] booting the probe guest under strace ...", flush=True)
                life.boot(timeout=600)
                if scenario == "quit":
                    print(f"[{scenario}] disk, NIC, hot-plug, balloon, stop/cont ...", flush=True)
                    life.exercise(timeout=300)
                    code = life.quit(timeout=300)
                else:
                    life.vm.command("blk 0 read 0 8", 300)
                    code = life.sigterm(timeout=300)
                print(f"[{scenario}] VMM exit code {code}", flush=True)
                if code != 0:
                    print(life.vm.err.text()[-3000:])
                    traces.killed.append(f"{scenario}: exit code {code}")
            except AssertionError as exc:
                traces.killed.append(f"{scenario}: {str(exc)[:2000]}")
            finally:
                life.close()
                ns.close()
            traces.add_run(prefix_path, None)
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
    return report(traces, args)


def report(traces: Traces, args) -> int:
    names = ioctl_names()
    missing_total = 0
    print()
    print(f"seccomp: {'off (-disable-seccomp)' if args.disable_seccomp else 'on'}; "
          f"threads seen: {dict(traces.threads)}")
    for kind in sorted(traces.counts):
        counter = traces.counts[kind]
        print(f"\n== {kind} threads: {len(counter)} distinct calls ==")
        print(f"{'system call':<40} {'count':>9}  policy")
        for call, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
            label = call
            if call.startswith("ioctl 0x"):
                label = f"{call} {names.get(int(call.split()[1], 16), '')}".rstrip()
            ok = policy_allows(kind, call)
            missing_total += not ok
            print(f"{label:<40} {count:>9}  {'allowed' if ok else 'MISSING'}")
    print("\n== allow-list sizes ==")
    for kind in ThreadKind:
        rules = POLICY[kind]
        calls = {r.syscall for r in rules}
        ioctls = sum(1 for r in rules if r.syscall == "ioctl" and r.args)
        print(f"{kind.value:<8} {len(calls):>3} system calls ({ioctls} ioctl request numbers)")
    for k in traces.killed:
        print(f"\nPROBLEM: {k}")
    print(f"\n{missing_total} call(s) seen that the policy lacks; {len(traces.killed)} problem(s)")
    return 1 if missing_total or traces.killed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disable-seccomp", action="store_true", help="run the VMM without filters")
    parser.add_argument("--keep", metavar="DIR", help="keep the traces in DIR")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
