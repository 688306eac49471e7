"""``python -m pystratovirt`` is the ``stratovirt`` command."""

import sys

from .cli import main

sys.exit(main())
