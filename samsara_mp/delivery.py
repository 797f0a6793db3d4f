"""Settle one batch with the API: what was delivered, what was rejected, what waits.

A 2xx delivers the batch (one unlike the API's 202 with JSON is logged once as a
likely misrouting). A 400 whose body is the API's positional answer
(one entry per event, ``"OK"`` for the valid ones) rejects exactly the events
it marks and resends the rest; any other 400, and a 413, splits the batch in
halves until the bad or oversized events stand alone. 408, 429, 5xx, 3xx,
401/403/407 (refused credentials: the events are fine) and network failures
stop the settlement with a retry hint; what was settled before them stays
settled. Other 4xx reject the batch (logged and counted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._redact import redact_url
from .retry import is_auth_failure, is_redirect_status, is_retryable_status, parse_retry_after
from .transport import Body, HTTPAnswer, Transport, TransportError

__all__ = ["Outcome", "settle"]

log = logging.getLogger("samsara_mp")
# Whether this process has said that a 2xx did not look like the API's (once: it is a
# misrouting that stays until someone fixes the network, and every batch would repeat it).
_warned_odd_2xx = False


class Outcome:
    """The result of settling one batch (indexes into the batch)."""

    __slots__ = (
        "delivered", "rejected", "retry", "retry_after", "error", "status", "requests",
        "raw_bytes", "sent_bytes", "statuses", "reject_reasons", "last_answer", "pending",
        "auth_failure",
    )

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self.rejected: list[int] = []
        self.retry = False
        self.retry_after: float | None = None
        self.error: str | None = None
        self.status: int | None = None
        self.requests = 0
        self.raw_bytes = 0
        self.sent_bytes = 0
        self.statuses: dict[int, int] = {}
        self.reject_reasons: list[str] = []
        self.last_answer: HTTPAnswer | None = None
        self.pending = 0
        # The status (401, 403, 407) when the credentials were refused.
        self.auth_failure: int | None = None

    def __repr__(self) -> str:
        return (f"Outcome(delivered={len(self.delivered)}, rejected={len(self.rejected)}, "
                f"retry={self.retry}, status={self.status}, error={self.error!r})")


class _Stop(Exception):
    pass


def settle(
    transport: Transport,
    payloads: Sequence[bytes],
    on_answer: Callable[[int, HTTPAnswer], None] | None = None,
    now: Callable[[], float] = time.time,
    body: Body | None = None,
) -> Outcome:
    """Send ``payloads`` until each is delivered or rejected, or a retryable failure.

    ``body`` is the whole batch already encoded (``Transport.encode``), used
    whenever the whole batch is sent.
    """
    out = Outcome()

    def post(indexes: list[int]) -> HTTPAnswer:
        out.requests += 1
        try:
            if len(indexes) == len(payloads):
                answer = transport.post(payloads, body)
            else:
                answer = transport.post([payloads[i] for i in indexes])
        except TransportError as exc:
            out.retry = True
            out.error = str(exc)
            out.raw_bytes += exc.raw_bytes
            raise _Stop from exc
        out.raw_bytes += answer.raw_bytes
        out.sent_bytes += answer.sent_bytes
        out.statuses[answer.status] = out.statuses.get(answer.status, 0) + 1
        out.status = answer.status
        out.last_answer = answer
        if on_answer is not None:
            on_answer(len(indexes), answer)
        return answer

    def run(indexes: list[int]) -> list[list[int]]:
        """Send one run of the batch; the runs still to send after it, in order."""
        answer = post(indexes)
        status = answer.status
        if answer.ok:
            out.delivered.extend(indexes)
            _check_2xx(answer)
            return []
        if is_retryable_status(status):
            out.retry = True
            out.retry_after = parse_retry_after(_header(answer, "Retry-After"), now)
            out.error = f"HTTP {status}: {answer.text(200)}"
            raise _Stop
        if is_auth_failure(status):
            out.retry = True
            out.auth_failure = status
            out.retry_after = parse_retry_after(_header(answer, "Retry-After"), now)
            out.error = (f"HTTP {status}: the credentials were refused; events kept and retried "
                         f"(check the url's credentials, headers or proxy): {answer.text(200)}")
            raise _Stop
        if is_redirect_status(status):
            out.retry = True
            out.error = (f"HTTP {status}: the API redirects to "
                         f"{redact_url(_header(answer, 'Location') or '(no Location)')}; not followed, "
                         "events kept (check the configured url)")
            log.warning("samsara_mp: %s", out.error)
            raise _Stop
        if status == 400:
            verdicts = _positional(answer, len(indexes))
            if verdicts is not None:
                bad = [i for i, v in zip(indexes, verdicts, strict=True) if v != "OK"]
                good = [i for i, v in zip(indexes, verdicts, strict=True) if v == "OK"]
                out.rejected.extend(bad)
                out.reject_reasons.extend(str(v) for v in verdicts if v != "OK")
                out.error = f"HTTP 400: {len(bad)} invalid events rejected"
                return [good] if good else []
        if status in (400, 413) and len(indexes) > 1:
            out.error = f"HTTP {status}: batch of {len(indexes)} split in halves"
            half = len(indexes) // 2
            return [indexes[:half], indexes[half:]]
        out.rejected.extend(indexes)
        out.error = f"HTTP {status}: {answer.text(200)}"
        out.reject_reasons.append(out.error)
        log.warning("samsara_mp: API refused %d events with %s", len(indexes), out.error)
        return []

    # Iterative, depth first: an API that marks one event bad per answer takes
    # as many rounds as events, which recursion would not survive.
    todo = [list(range(len(payloads)))]
    try:
        while todo:
            todo.extend(reversed(run(todo.pop())))
    except _Stop:
        pass
    out.pending = len(payloads) - len(out.delivered) - len(out.rejected)
    return out


def _check_2xx(answer: HTTPAnswer) -> None:
    """The API answers 202 with JSON: another 2xx, or an HTML page, is most likely a proxy
    or a load balancer answering in its place. Counted delivered (it said 2xx), logged once."""
    global _warned_odd_2xx
    if _warned_odd_2xx:
        return
    html = answer.body.lstrip()[:1] == b"<" or "html" in (_header(answer, "Content-Type") or "")
    if answer.status != 202 or html:
        _warned_odd_2xx = True
        log.warning(
            "samsara_mp: the API answered HTTP %d%s, not its 202 with JSON: a proxy or load "
            "balancer may be answering in its place (check the url and proxy); counted "
            "delivered. Said once per process.", answer.status, " with an HTML page" if html else "")


def _header(answer: HTTPAnswer, name: str) -> str | None:
    for key, value in answer.headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _positional(answer: HTTPAnswer, n: int) -> list[Any] | None:
    """The per-event verdicts when the 400 body is the API's aligned list with a bad entry."""
    try:
        body = answer.json()
    except ValueError:
        return None
    if not isinstance(body, list) or len(body) != n:
        return None
    if all(v == "OK" for v in body):
        return None
    return body
