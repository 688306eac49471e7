import sys

from .jailer import main

sys.exit(main())
