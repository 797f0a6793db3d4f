"""Injected failures for the reference server: the rule and the queue it waits in.

Tests queue rules through ``IngestServer.inject`` or ``POST /_test/faults``;
each event POST the publisher sends takes the head rule, so a test can put a
503, a ``Retry-After``, latency, a hung or a reset connection on the
publisher's path without faking the network.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

FAULT_MODES: Final = ("hang", "reset", "trickle")


@dataclass(frozen=True)
class FaultRule:
    """One queued fault, applied to the next ``count`` event POSTs.

    ``status=None`` answers normally (after ``latency``); ``mode="hang"``
    never answers until the server stops or ``hang_seconds`` pass, then closes
    the connection; ``mode="reset"`` closes it at once with a TCP reset;
    ``mode="trickle"`` sends its answer (``status``, 503 by default) one byte
    every ``trickle_interval`` seconds (0.5 by default), as a failing proxy can.
    """

    status: int | None = 503
    count: int = 1
    retry_after: str | None = None
    body: str | None = None
    latency: float | None = None
    mode: str | None = None
    hang_seconds: float | None = None
    location: str | None = None  # a Location header, for redirects (3xx)
    trickle_interval: float | None = None

    def __post_init__(self) -> None:
        if self.status is not None and (
            type(self.status) is not int or not 100 <= self.status <= 599
        ):
            raise ValueError(
                f"status: must be an HTTP status 100..599 or null, got {self.status!r}"
            )
        if type(self.count) is not int or self.count < 1:
            raise ValueError(f"count: must be an integer >= 1, got {self.count!r}")
        if self.retry_after is not None and not isinstance(self.retry_after, str):
            raise ValueError("retry_after: must be a string (sent verbatim)")
        if self.location is not None and not isinstance(self.location, str):
            raise ValueError("location: must be a string (sent verbatim)")
        if self.body is not None and not isinstance(self.body, str):
            raise ValueError("body: must be a string")
        for key in ("latency", "hang_seconds", "trickle_interval"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise ValueError(f"{key}: must be a number of seconds >= 0")
        if self.mode is not None and self.mode not in FAULT_MODES:
            raise ValueError(f"mode: must be one of {FAULT_MODES} or null, got {self.mode!r}")

    @classmethod
    def from_json(cls, obj: object) -> FaultRule:
        """Build a rule from the admin API's JSON object; ValueError names the bad key."""
        if not isinstance(obj, dict):
            raise TypeError("a fault must be a JSON object")
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _FaultQueue:
    """Rules in FIFO order, each with the POSTs it has left.

    Not locked itself: the server's state object holds its one lock around
    every call, so a reset can clear the queue in the same critical section.
    """

    def __init__(self) -> None:
        self._rules: collections.deque[list[Any]] = collections.deque()

    def __len__(self) -> int:
        return len(self._rules)

    def extend(self, rules: Sequence[FaultRule]) -> int:
        """Queue ``rules`` after the earlier ones; returns how many rules wait."""
        self._rules.extend([rule, rule.count] for rule in rules)
        return len(self._rules)

    def clear(self) -> int:
        """Drop every rule; returns how many were dropped."""
        n = len(self._rules)
        self._rules.clear()
        return n

    def take(self) -> FaultRule | None:
        """The rule for the next event POST, spending one of its count; None when empty."""
        if not self._rules:
            return None
        head = self._rules[0]
        head[1] -= 1
        if head[1] <= 0:
            self._rules.popleft()
        rule: FaultRule = head[0]
        return rule

    def pending(self) -> list[tuple[FaultRule, int]]:
        """Each waiting rule with the POSTs it has left, head first."""
        return [(rule, n) for rule, n in self._rules]

    def remaining(self) -> int:
        """Event POSTs the queued rules will still answer."""
        return sum(n for _, n in self._rules)
