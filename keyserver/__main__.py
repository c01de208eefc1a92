"""``python -m keyserver serve DIR`` (also init, audit, rotate-master)."""

import sys

from .commands import main

sys.exit(main())
