"""``python -m samsara_mp``: the same command line as ``samsara-mp``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
