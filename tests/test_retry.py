"""The backoff policy, without sleeping."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

from samsara_mp.retry import RetryPolicy, is_retryable_status, parse_retry_after


def test_full_jitter_draws_between_zero_and_the_capped_exponential() -> None:
    seen: list[tuple[float, float]] = []

    def rng(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return hi

    policy = RetryPolicy(base=0.1, cap=1.0, rng=rng)
    delays = [policy.delay(n) for n in range(1, 8)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert all(lo == 0.0 for lo, _ in seen)


def test_retry_after_wins_and_is_capped() -> None:
    policy = RetryPolicy(base=0.1, cap=1.0, max_retry_after=60.0)
    assert policy.delay(1, retry_after=7.0) == 7.0
    assert policy.delay(1, retry_after=3600.0) == 60.0


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("120") == 120.0
    now = 1_700_000_000.0
    when = format_datetime(datetime.fromtimestamp(now + 30, tz=UTC), usegmt=True)
    assert parse_retry_after(when, now=lambda: now) == 30.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_which_statuses_are_retried() -> None:
    assert all(is_retryable_status(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(is_retryable_status(s) for s in (200, 202, 400, 401, 404, 413))
