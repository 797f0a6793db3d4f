"""The publish loop: a thread in the publisher process that empties the buffer.

It waits until a full batch is buffered, a flush is asked for, the last
batch was full (the publisher is behind: it sends the rest at once), or the
``publish_interval`` tick finds at least ``min_buffer_size`` events (or events
that have waited a whole interval below that minimum); then it peeks a batch,
settles it with the API, commits the outcome to the buffer, and on a
retryable failure backs off as the ``RetryPolicy`` says, keeping the events.

One batch is in flight at a time, so batches reach the API in buffer order.
While it is in flight, a helper thread peeks and encodes (joins and gzips)
the batch after it, so that work overlaps the API's; the prepared batch is
sent next only if the buffer's head is then exactly where it starts (the
batch before it was wholly settled and nothing was dropped meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .buffer import Batch, SharedBuffer
from .config import Config
from .delivery import Outcome, settle
from .retry import RetryPolicy
from .supervise import Supervisor
from .transport import Body, Transport

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["PublishLoop"]

log = logging.getLogger("samsara_mp")


class PublishLoop:
    """Owns the publishing thread of one publisher; start, flush, drain, stop."""

    def __init__(
        self,
        buffer: SharedBuffer,
        config: Config,
        transport: Transport | None = None,
        policy: RetryPolicy | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.buffer = buffer
        self.config = config
        self._transport = transport
        self._owns_transport = transport is None  # made here, so remade after an error
        self.policy = policy or RetryPolicy(
            base=config.backoff_base / 1000.0, cap=config.backoff_cap / 1000.0
        )
        self._on_outcome = on_outcome
        self._thread: threading.Thread | None = None
        self._prepare: ThreadPoolExecutor | None = None
        self._next: Future[tuple[Batch, Body]] | None = None
        self._stop = threading.Event()
        # An unexpected error in the loop is logged, counted, and the loop goes on.
        self.supervisor = Supervisor(self._stop, config.backoff_base / 1000.0, config.backoff_cap / 1000.0)
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
            "prepared": 0,  # batches sent as the helper had prepared them during the last request
            "failed_attempts": 0,
            "statuses": {},
            "last_error": None,
            "last_error_at": None,
            "last_success_at": None,
            "backoff_until": None,
        }

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
        # The helper that prepares the next batch is made on the loop's thread, when
        # it starts: concurrent.futures is a few ms of imports that a new publisher
        # need not pay before it takes its first push.
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
        """Wait until every event before ``target`` has left the buffer (and the outage
        spool, where overflow may have moved some), or timeout."""
        buf = self.buffer
        return buf.wait(lambda: buf.head_seq >= target and not buf.spool_pending(), timeout)

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
        from concurrent.futures import ThreadPoolExecutor

        self._prepare = ThreadPoolExecutor(1, thread_name_prefix="samsara-mp-prepare")
        try:
            self.supervisor.run("publish loop", self._loop, on_error=self._reset_after_error)
        finally:
            if self._prepare is not None:
                self._prepare.shutdown(wait=False, cancel_futures=True)
            if self._transport is not None:
                self._transport.close()

    def _loop(self) -> None:
        while self._wait_for_work():
            self._publish_one()

    def _reset_after_error(self) -> None:
        """After an unexpected error: nothing half-done is reused. The batch in flight was
        only peeked, so its events are still buffered and are sent again."""
        self._next = None
        self._behind = False
        if self._owns_transport and self._transport is not None:
            transport, self._transport = self._transport, None
            transport.close()

    def _ready(self) -> bool:
        """Called under the buffer's lock: is there a reason to publish right now?"""
        if self._stop.is_set() or self._draining:
            return True
        if self.buffer.spool_pending():
            return True  # a backlog on disk: send it at once
        n = len(self.buffer)
        if not n:
            return False
        cfg = self.config
        return (
            n >= cfg.max_batch_size
            or self.buffer.nbytes >= cfg.max_batch_bytes
            or self.buffer.head_seq < self._flush_target
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
        batch: Batch | None = None
        body: Body | None = None
        if self.buffer.spool_pending():
            # Spooled events are older than any buffered one: they go first, so that
            # each source's order holds. One batch of them in memory at a time.
            self._next = None
            batch = self.buffer.peek_spool(cfg.max_batch_size, cfg.max_batch_bytes)
            if not batch.payloads:
                batch = None
        else:
            batch, body = self._take_prepared()
        if batch is None:
            batch = self.buffer.peek(cfg.max_batch_size, cfg.max_batch_bytes)
        if not batch.payloads:
            return
        if (self._prepare is not None and batch.full and not self._failures
                and batch.positions is None):
            # A backlog: the next batch is already there to prepare.
            self._next = self._prepare.submit(self._prepare_after, batch)
        outcome = settle(self.transport, batch.payloads, body=body)
        self.buffer.commit(batch, outcome.delivered, outcome.rejected)
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

    def _prepare_after(self, batch: Batch) -> tuple[Batch, Body]:
        """Runs in the helper thread: peek and encode the batch that follows ``batch``."""
        cfg = self.config
        after = batch.first_seq + len(batch.payloads)
        following = self.buffer.peek(cfg.max_batch_size, cfg.max_batch_bytes, from_seq=after)
        return following, self.transport.encode(following.payloads)

    def _take_prepared(self) -> tuple[Batch | None, Body | None]:
        """The batch prepared during the last request, when it is still the right one to send."""
        future, self._next = self._next, None
        if future is None:
            return None, None
        try:
            batch, body = future.result()
        except Exception:  # noqa: BLE001 - preparing is an optimisation; peek afresh
            log.exception("samsara_mp: preparing the next batch failed")
            return None, None
        if not batch.payloads or self.buffer.head_seq != batch.first_seq:
            return None, None  # the batch before it was not wholly settled, or events were dropped
        if self.buffer.spool_pending():
            return None, None  # overflow moved events to disk meanwhile: they go first
        if not batch.full and len(self.buffer) > len(batch.payloads):
            return None, None  # more arrived since: a fresh peek sends a bigger batch
        self.stats["prepared"] += 1
        return batch, body

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
