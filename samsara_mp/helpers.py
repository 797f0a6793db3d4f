"""Small helpers kept at the original SDK's import path."""

from __future__ import annotations

import time

__all__ = ["current_time_millis"]


def current_time_millis() -> int:
    """The current wall-clock time as integer epoch milliseconds."""
    return time.time_ns() // 1_000_000
