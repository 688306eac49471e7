"""Run one VM from a pickled, hand-built VmConfig, as the ``stratovirt`` command would run a parsed
one: for integration tests of what the machine can build that the early command line cannot
express (a file or pty chardev, a console port number). ``python -m helpers.run_vmconfig FILE``."""

from __future__ import annotations

import pickle
import sys

from pystratovirt.cli import _setup_logging, run_vm
from pystratovirt.errors import PyStratoVirtError


def main(path: str) -> int:
    with open(path, "rb") as f:
        config = pickle.load(f)
    _setup_logging(config.log_file)
    try:
        return run_vm(config)
    except PyStratoVirtError as exc:
        print(f"stratovirt: {exc.desc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
