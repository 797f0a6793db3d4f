"""The backoff policy: how long until the next try, and whether a status is retryable.

A frozen object that the publish loop, the shipper's reconnects and waits for
room, and the supervisor of every long-lived thread ask; none has a formula of
its own. Exponential backoff with full jitter (a uniform draw between 0 and the
capped exponential), overridden by a server's ``Retry-After`` when it gives
one (docs/design.md, "Publishing").
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

__all__ = ["RetryPolicy", "parse_retry_after", "is_retryable_status", "is_auth_failure"]

_RETRYABLE = frozenset({408, 429})


def is_retryable_status(status: int) -> bool:
    """408, 429 and every 5xx are worth trying again as a whole."""
    return status in _RETRYABLE or 500 <= status <= 599


# The events are fine, the credentials are not (a rotation, a proxy's login): keep them.
_AUTH_FAILURES = frozenset({401, 403, 407})


def is_auth_failure(status: int) -> bool:
    """401, 403 and a proxy's 407: refused credentials, retried with the events kept."""
    return status in _AUTH_FAILURES


def is_redirect_status(status: int) -> bool:
    """A 3xx: a misconfigured URL, never a delivery; kept and retried like an outage."""
    return 300 <= status <= 399


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        from email.utils import parsedate_to_datetime  # here: a slow import, rarely needed

        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now())


class RetryPolicy:
    """Exponential backoff with full jitter, capped; ``Retry-After`` wins when given."""

    __slots__ = ("base", "cap", "max_retry_after", "rng")

    def __init__(
        self, base: float = 0.1, cap: float = 30.0, max_retry_after: float = 300.0,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.base = base
        self.cap = cap
        self.max_retry_after = max_retry_after
        self.rng = rng

    @classmethod
    def from_config(cls, config: Config) -> RetryPolicy:
        """The policy ``backoff_base`` and ``backoff_cap`` (ms) configure."""
        return cls(base=config.backoff_base / 1000.0, cap=config.backoff_cap / 1000.0)

    def __repr__(self) -> str:
        return f"RetryPolicy(base={self.base}, cap={self.cap}, max_retry_after={self.max_retry_after})"

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try number ``attempt + 1`` (``attempt`` counts failures, from 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return self.rng(0.0, self.ceiling(attempt))

    def ceiling(self, attempt: int) -> float:
        """The largest delay a jittered draw may give for ``attempt``."""
        return min(self.cap, self.base * (2.0 ** min(max(attempt - 1, 0), 32)))
