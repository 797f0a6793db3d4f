"""What every ``samsara-mp`` command shares: its exit codes and its error line on stderr.
Exit codes: 0 ok, 1 failure or refused by the API, 2 usage error (an invalid event or configuration
too), 3 no publisher reachable (for ``publisher``: another publisher already holds the channel)."""

from __future__ import annotations

import sys

__all__ = ["EXIT_FAILURE", "EXIT_NO_PUBLISHER", "EXIT_OK", "EXIT_USAGE", "err"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_PUBLISHER = 3


def err(message: str) -> None:
    print(f"samsara-mp: {message}", file=sys.stderr)
