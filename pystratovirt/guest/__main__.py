"""``python -m pystratovirt.guest``: build the test guests.

* ``probe [-o FILE]`` -- build the probe guest ELF (cached) and print its path;
* ``linux ...`` -- the Linux guest kit; everything after ``linux`` goes to
  :func:`pystratovirt.guest.kit.main`, imported only then so the probe needs none of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _probe(argv: list[str]) -> int:
    from .build import ProbeBuildError, build_probe

    parser = argparse.ArgumentParser(prog="python -m pystratovirt.guest probe",
                                     description="Build the probe guest (a bare-metal x86_64 ELF).")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="copy the ELF here (default: print the cached build's path)")
    args = parser.parse_args(argv)
    try:
        path = build_probe(args.output)
    except ProbeBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "probe":
        return _probe(argv[1:])
    if argv and argv[0] == "linux":
        from . import kit

        return kit.main(argv[1:])
    print("usage: python -m pystratovirt.guest {probe [-o FILE] | linux ...}", file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
