"""The publish loop: a thread in the publisher process that empties the ring.

It waits until a full batch is buffered, a flush is asked for, the last
batch was full (the publisher is behind: it sends the rest at once), or the
``publish_interval`` tick finds at least ``min_buffer_size`` events (or events
that have waited a whole interval below that minimum). Then it takes a batch
into the ring's in-flight slot, settles it with the API, and counts what
left; what did not stays in flight and is sent again after a backoff (one
``RetryPolicy``), before anything newer, so batches reach the API in order
(docs/design.md, "Publishing").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import Config
from .delivery import Outcome, settle
from .retry import RetryPolicy
from .ring import Ring
from .supervise import Supervisor
from .transport import Transport

__all__ = ["PublishLoop"]

log = logging.getLogger("samsara_mp")


class PublishLoop:
    """Owns the publishing thread of one publisher; start, flush, drain, stop."""

    def __init__(
        self,
        buffer: Ring,
        config: Config,
        transport: Transport | None = None,
        policy: RetryPolicy | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.buffer = buffer
        self.config = config
        self._transport = transport
        self._owns_transport = transport is None  # made here, so remade after an error
        self.policy = policy or RetryPolicy.from_config(config)
        self._on_outcome = on_outcome
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # An unexpected error in the loop is logged, counted, and the loop goes on.
        self.supervisor = Supervisor(self._stop, RetryPolicy.from_config(config))
        self._draining = False
        self._drain_deadline = 0.0
        self._flush_target = -1
        self._failures = 0
        self._kick = False
        # The last batch was full and delivered: the publisher is behind, so it
        # sends what waits at once instead of at the next interval tick.
        self._behind = False
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {
            "batches": 0,
            "requests": 0,
            "bytes_raw": 0,
            "bytes_sent": 0,
            "retries": 0,
            "failed_attempts": 0,
            "statuses": {},
            "last_error": None,
            "last_error_at": None,
            "last_success_at": None,
            "backoff_until": None,
            # The API refuses the credentials (401/403, or a proxy's 407) since the
            # last delivery: the events wait, and `samsara-mp status` fails.
            "auth_failing": False,
            "last_auth_failure_at": None,
        }
        self._auth_logged_at: float | None = None

    @property
    def transport(self) -> Transport:
        """Made at the first publish, in the loop's thread: the publisher serves before it
        loads requests, and the import does not compete for the GIL with the first
        handshakes (which it slowed past a 0.1 s ship deadline under uWSGI)."""
        if self._transport is None:
            cfg = self.config
            self._transport = Transport.from_config(cfg)
        return self._transport

    # ---- control ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="samsara-mp-publish", daemon=True)
        self._thread.start()

    def request_flush(self) -> int:
        """Publish everything buffered now, ignoring the interval; returns the target seq."""
        target = self.buffer.tail_seq
        with self._lock:
            self._flush_target = max(self._flush_target, target)
            # A flush means "try now": it cuts a backoff wait short, once (not a
            # Retry-After the API gave: see _backoff).
            self._kick = True
        self.buffer.wake()
        return target

    def wait_flushed(self, target: int, timeout: float) -> bool:
        """Wait until every event pushed before ``target`` has left the ring, the
        in-flight slot and the spool, or timeout."""
        buf = self.buffer
        return buf.wait(lambda: buf.flushed(target), timeout)

    def _pending(self) -> int:
        """Events waiting: the buffer's, plus one for a non-empty outage spool."""
        return len(self.buffer) + (1 if self.buffer.spool_pending() else 0)

    def drain(self, timeout: float) -> bool:
        """Publish what is left within ``timeout``, then stop; True when the buffer emptied."""
        self._drain_deadline = time.monotonic() + timeout
        self._draining = True
        with self._lock:
            self._kick = True  # the drain's first try does not wait out an old backoff
        self.buffer.wake()
        if self._thread is not None:
            self._thread.join(timeout + self.config.send_timeout_s + 1.0)
        self._stop.set()
        return len(self.buffer) == 0 and not self.buffer.spool_pending()

    def stop(self) -> None:
        self._stop.set()
        self.buffer.wake()
        if self._thread is not None:
            self._thread.join(self.config.send_timeout_s + 1.0)

    # ---- the loop ----
    @property
    def alive(self) -> bool:
        """True while the loop's thread runs and its supervisor has not given up on it."""
        return self._thread is not None and self._thread.is_alive() and self.supervisor.failed is None

    @property
    def failed(self) -> bool:
        return self.supervisor.failed is not None

    def _run(self) -> None:
        try:
            self.supervisor.run("publish loop", self._loop, on_error=self._reset_after_error)
        finally:
            if self._transport is not None:
                self._transport.close()

    def _loop(self) -> None:
        while self._wait_for_work():
            self._publish_one()

    def _reset_after_error(self) -> None:
        """After an unexpected error: nothing half-done is reused. The batch in flight
        stays in its slot and is sent again."""
        self._behind = False
        if self._owns_transport and self._transport is not None:
            transport, self._transport = self._transport, None
            transport.close()

    def _ready(self) -> bool:
        """Called under the buffer's lock: is there a reason to publish right now?"""
        if self._stop.is_set() or self._draining:
            return True
        buf = self.buffer
        if buf.in_flight is not None or buf.spool_pending():
            return True  # a batch to send again, or a backlog on disk: at once
        n = len(buf)
        if not n:
            return False
        cfg = self.config
        return (
            n >= cfg.max_batch_size
            or buf.nbytes >= cfg.max_batch_bytes
            or not buf.flushed(self._flush_target)
            or self._behind
        )

    def _wait_for_work(self) -> bool:
        interval = self.config.publish_interval_s
        next_tick = time.monotonic() + interval
        while True:
            if self._stop.is_set():
                return False
            if self._draining:
                return self._pending() > 0 and time.monotonic() < self._drain_deadline
            if self._ready():
                return True
            now = time.monotonic()
            if now >= next_tick:
                n = len(self.buffer)
                age = self.buffer.oldest_age() if n else 0.0
                if n and (n >= self.config.min_buffer_size or age >= interval):
                    return True
                # Fewer than min_buffer_size: they go once the oldest has waited a
                # whole interval, not at the tick after (which made it nearly two).
                next_tick = now + (max(interval - age, 0.001) if n else interval)
            timeout = next_tick - time.monotonic()
            if self.buffer.spilling:
                self.buffer.sync_spool()  # the fsync interval holds when pushes stop
                timeout = min(timeout, 0.1)
            self.buffer.wait(self._ready, max(timeout, 0.0))

    def _publish_one(self) -> None:
        cfg = self.config
        batch = self.buffer.take(cfg.max_batch_size, cfg.max_batch_bytes)
        if batch is None:
            return
        outcome = settle(self.transport, batch.payloads)
        self.buffer.settle(batch, outcome.delivered, outcome.rejected)
        self._account(outcome)
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:  # noqa: BLE001 - a user hook must not stop publishing
                log.exception("samsara_mp: outcome hook failed")
        self._behind = batch.full and not outcome.retry
        if outcome.retry:
            self._backoff(outcome)
        else:
            if self._failures:
                log.info("samsara_mp: API reachable again after %d failed tries", self._failures)
            self._failures = 0

    def _account(self, outcome: Outcome) -> None:
        s = self.stats
        s["batches"] += 1
        s["requests"] += outcome.requests
        s["bytes_raw"] += outcome.raw_bytes
        s["bytes_sent"] += outcome.sent_bytes
        for status, count in outcome.statuses.items():
            s["statuses"][status] = s["statuses"].get(status, 0) + count
        if outcome.delivered:
            s["last_success_at"] = time.time()
        if outcome.auth_failure is not None:
            s["auth_failing"] = True
            s["last_auth_failure_at"] = time.time()
            now = time.monotonic()
            # ERROR, as nothing is delivered until someone fixes the credentials; once a
            # minute, as a rotation or an expired key would otherwise log every backoff.
            if self._auth_logged_at is None or now - self._auth_logged_at >= 60.0:
                self._auth_logged_at = now
                log.error("samsara_mp: the API answers HTTP %d: the credentials are refused; "
                          "%d events kept and retried", outcome.auth_failure, len(self.buffer))
        elif outcome.delivered:
            s["auth_failing"] = False
        if outcome.error:
            s["last_error"] = outcome.error
            s["last_error_at"] = time.time()

    def _backoff(self, outcome: Outcome) -> None:
        with self._lock:
            self._failures += 1
            failures = self._failures
        self.stats["failed_attempts"] += 1
        self.stats["retries"] += 1
        delay = self.policy.delay(failures, outcome.retry_after)
        if failures == 1 or delay >= 1.0:
            log.warning(
                "samsara_mp: publish failed (%s); %d events kept, retry %d in %.2fs",
                outcome.error, len(self.buffer), failures, delay,
            )
        if self._draining:
            delay = min(delay, max(self._drain_deadline - time.monotonic(), 0.0))
        self.stats["backoff_until"] = time.time() + delay
        # A stop cuts the wait short; new pushes do not. A flush request cuts our own
        # backoff short, but never the API's Retry-After: only a stop (or the end of
        # a drain, bounded above) sends before the API said it would take more.
        if outcome.retry_after is not None and not self._draining:
            self.buffer.wait(lambda: self._stop.is_set() or self._draining, delay)
        else:
            self.buffer.wait(lambda: self._stop.is_set() or self._kick, delay)
        with self._lock:
            self._kick = False
        self.stats["backoff_until"] = None
