#!/usr/bin/env python3
"""QMP fuzz run against a live VMM: a seeded stream of hostile messages, every reply checked.

Boots the probe guest with a QMP socket and sends ``--messages`` (default 100,000) messages from
the fuzzer in ``tests/helpers/qmpfuzz.py`` (the same one the CI test runs for 10,000): real
commands with hostile arguments, mutated and broken JSON, messages past the 64 KiB limit,
100,000-deep nesting, random bytes, truncated messages, and SCM_RIGHTS descriptors of odd kinds.
Every message must get exactly its replies, in order, with its own id, none of them an
"Internal error"; afterwards the VM must still answer query-status and its serial console, every
descriptor it was sent must be released, and a new client must be served. Prints the counts.

    python bench/qmp_fuzz.py
    python bench/qmp_fuzz.py --messages 1000000 --seed 7
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import qmpfuzz
from helpers.vmproc import Qmp, VmProcess, wait_for_path


def open_fds(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=20240909)
    args = ap.parse_args()

    from pystratovirt.guest.build import build_probe
    probe = str(build_probe())
    odd = qmpfuzz.odd_descriptors()
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "vm.sock"
        with VmProcess(["-kernel", probe, "-serial", "stdio", "-smp", "2",
                        "-api-channel", f"unix:{sock}"]) as vm:
            vm.wait_for(r"(?m)^ready\r?$", 60)
            wait_for_path(sock)
            with Qmp(sock) as qmp:
                baseline = open_fds(vm.pid)
                gen = qmpfuzz.Generator(args.seed, odd)
                result = qmpfuzz.run(qmp.sock, (gen.next() for _ in range(args.messages)),
                                     timeout=120)
                qmpfuzz.release_names(lambda c: qmp.execute(c["execute"], c["arguments"]),
                                      result)
                if qmp.execute("query-status")[1]["return"]["status"] == "paused":
                    qmp.execute("cont")
                alive = vm.command("echo alive") == ["alive"]
                leaked = open_fds(vm.pid) - baseline
            with Qmp(sock) as again:
                status = again.execute("query-status")[1]["return"]["status"]
                again.execute("quit")
            code = vm.wait_exit(30)
            traceback = "Traceback" in vm.err.text()
    for fd in odd:
        os.close(fd)

    print(f"seed {args.seed}: {result.sent} messages in {result.seconds:.1f} s "
          f"({result.sent / result.seconds:.0f}/s), {result.replies} replies, "
          f"{result.events} events, {result.fds_sent} descriptors sent")
    print(f"{'message kind':<14}{'count':>9}")
    for kind, n in sorted(result.kinds.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<14}{n:>9}")
    print(f"{'reply':<16}{'count':>7}")
    for cls, n in sorted(result.classes.items(), key=lambda kv: -kv[1]):
        print(f"{cls:<16}{n:>7}")
    print(f"afterwards: serial console {'answers' if alive else 'DEAD'}, new client sees "
          f"'{status}', descriptors leaked: {len(leaked)}, exit code {code}, "
          f"traceback in stderr: {traceback}")
    return 0 if alive and not leaked and code == 0 and not traceback else 1


if __name__ == "__main__":
    sys.exit(main())
