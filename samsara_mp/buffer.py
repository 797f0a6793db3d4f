"""SharedBuffer: the channel's one bounded ring of encoded events.

It lives in the publisher process. Workers push batches into it over IPC; the
publish loop peeks a batch from its head, sends it, and commits the outcome.
Events leave only when delivered, rejected by the API, or dropped as the
oldest on overflow, and each way out is counted, so that at a quiet moment
``recorded = delivered + dropped_overflow + rejected + buffered + staged``.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice
from typing import Any

__all__ = ["SharedBuffer", "Batch", "Counters", "MAX_REMEMBERED_CLIENTS"]

# Push sequence numbers kept for de-duplication: gunicorn and Celery recycle
# workers, and each new process is a new client, so the map must be bounded.
MAX_REMEMBERED_CLIENTS = 10_000


@dataclass
class Counters:
    """Monotonic counters of one channel (except ``buffered``)."""

    recorded: int = 0
    received: int = 0
    delivered: int = 0
    dropped_overflow: int = 0
    dropped_staging: int = 0
    rejected: int = 0
    duplicate_pushes: int = 0
    spooled: int = 0
    dropped_spool: int = 0  # taken out to be spooled, but the spool could not be written
    pushes: int = 0
    # Reported by workers: never recorded (left out before staging), counted apart.
    filtered: int = 0
    sampled_out: int = 0


@dataclass(frozen=True)
class Batch:
    """A run of events peeked from the head: ``payloads[i]`` has seq ``first_seq + i``."""

    first_seq: int
    payloads: list[bytes]
    full: bool = False  # stopped at the count or byte budget, not at the buffer's end

    @property
    def raw_bytes(self) -> int:
        return sum(len(p) for p in self.payloads)


class SharedBuffer:
    """Bounded, drop-oldest ring with sequence numbers and peek/commit."""

    def __init__(self, max_size: int, clock: Any = time.monotonic) -> None:
        self._max = max_size
        self._ring: deque[bytes] = deque()
        self._bytes = 0
        self._head_seq = 0  # seq of self._ring[0]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._clock = clock
        self._oldest_since: float | None = None
        self._last_push: dict[str, int] = {}
        self.counters = Counters()

    # ---- worker side (called from IPC server threads) ----
    def push(
        self,
        payloads: Sequence[bytes],
        client_id: str = "",
        push_seq: int = -1,
        recorded: int | None = None,
        staging_dropped: int = 0,
        filtered: int = 0,
        sampled_out: int = 0,
    ) -> int:
        """Append a batch, dropping the oldest past the bound; returns events dropped now.

        ``client_id``/``push_seq`` make a retried push idempotent: a push whose
        seq the buffer has already taken from that client is acknowledged and
        ignored, so a worker that timed out waiting for an answer and pushes
        again cannot duplicate events or counts.
        """
        with self._lock:
            c = self.counters
            if client_id:
                if push_seq <= self._last_push.get(client_id, -1):
                    c.duplicate_pushes += 1
                    return 0
                # Most recent last; the oldest (long-gone workers) go first.
                self._last_push.pop(client_id, None)
                self._last_push[client_id] = push_seq
                if len(self._last_push) > MAX_REMEMBERED_CLIENTS:
                    del self._last_push[next(iter(self._last_push))]
            n = len(payloads)
            rec = n + staging_dropped if recorded is None else recorded
            c.pushes += 1
            c.recorded += rec
            c.received += n
            c.dropped_staging += staging_dropped
            c.filtered += filtered
            c.sampled_out += sampled_out
            if not n:
                return 0
            if not self._ring:
                self._oldest_since = self._clock()
            self._ring.extend(payloads)
            self._bytes += sum(map(len, payloads))
            dropped = len(self._ring) - self._max
            if dropped > 0:
                self._drop_head(dropped)
            self._changed.notify_all()
            return max(dropped, 0)

    def _drop_head(self, n: int) -> None:
        ring = self._ring
        popped = 0
        for _ in range(n):
            popped += len(ring.popleft())
        self._bytes -= popped
        self._head_seq += n
        self.counters.dropped_overflow += n
        self._oldest_since = self._clock() if ring else None

    # ---- publisher side ----
    def __len__(self) -> int:
        return len(self._ring)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def head_seq(self) -> int:
        return self._head_seq

    @property
    def tail_seq(self) -> int:
        """The seq the next pushed event will get."""
        with self._lock:
            return self._head_seq + len(self._ring)

    def oldest_age(self) -> float:
        """Seconds the head of the buffer has waited (0 when empty)."""
        since = self._oldest_since
        return 0.0 if since is None else self._clock() - since

    def peek(self, max_count: int, max_bytes: int, from_seq: int | None = None) -> Batch:
        """The oldest events, up to a count and a byte budget (always at least one).

        With ``from_seq``, the events from that seq on instead of from the head
        (the batch after one in flight); empty when that seq has left the buffer.
        """
        with self._lock:
            start = 0 if from_seq is None else from_seq - self._head_seq
            if not 0 <= start <= len(self._ring):
                return Batch(self._head_seq if from_seq is None else from_seq, [])
            # C-speed slices and sums; trim by bytes only when the budget is passed.
            out = list(islice(self._ring, start, start + max_count))
            full = start + len(out) < len(self._ring)  # more follow: the count stopped it
            sizes = list(accumulate(map(len, out)))
            if sizes and sizes[-1] > max_bytes:
                keep = max(bisect_right(sizes, max_bytes), 1)
                del out[keep:]
                full = True
            return Batch(self._head_seq + start, out, full)

    def wait(self, predicate: Any, timeout: float) -> bool:
        """Block until ``predicate()`` (called under the lock) holds, or timeout."""
        with self._changed:
            return bool(self._changed.wait_for(predicate, timeout))

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def commit(self, batch: Batch, delivered: Iterable[int], rejected: Iterable[int]) -> None:
        """Settle a sent batch: indexes into ``batch.payloads`` delivered or rejected.

        Events not named stay in the buffer, in order. Events of the batch that
        overflow dropped while it was in flight were counted as dropped; if
        the API took or refused them after all, they are moved to that count.
        """
        delivered = set(delivered)
        rejected = set(rejected)
        settled = delivered | rejected
        if not settled:
            return
        n = len(batch.payloads)
        if not rejected and len(delivered) == n:
            with self._lock:
                if self._head_seq == batch.first_seq and len(self._ring) >= n:
                    # The common case, a whole batch delivered and nothing dropped in flight.
                    popleft = self._ring.popleft
                    for _ in range(n):
                        popleft()
                    self._bytes -= sum(map(len, batch.payloads))
                    self._head_seq += n
                    self.counters.delivered += n
                    if not self._ring:
                        self._oldest_since = None
                    self._changed.notify_all()
                    return
        with self._lock:
            c = self.counters
            gone = min(max(self._head_seq - batch.first_seq, 0), len(batch.payloads))
            for i in range(gone):
                if i in delivered:
                    c.dropped_overflow -= 1
                    c.delivered += 1
                elif i in rejected:
                    c.dropped_overflow -= 1
                    c.rejected += 1
            region = max(max(settled) + 1 - gone, 0)
            ring = self._ring
            region = min(region, len(ring))
            keep: list[bytes] = []
            removed_bytes = 0
            for j in range(region):
                payload = ring.popleft()
                i = gone + j
                if i in delivered:
                    c.delivered += 1
                    removed_bytes += len(payload)
                elif i in rejected:
                    c.rejected += 1
                    removed_bytes += len(payload)
                else:
                    keep.append(payload)
            ring.extendleft(reversed(keep))
            self._bytes -= removed_bytes
            self._head_seq = self._head_seq + region - len(keep)
            if not ring:
                self._oldest_since = None
            self._changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """Counters plus the current fill, as a plain dict."""
        with self._lock:
            c = self.counters
            return {
                "recorded": c.recorded,
                "received": c.received,
                "delivered": c.delivered,
                "dropped_overflow": c.dropped_overflow + c.dropped_staging,
                "dropped_buffer": c.dropped_overflow,
                "dropped_staging": c.dropped_staging,
                "rejected": c.rejected,
                "buffered": len(self._ring),
                "buffered_bytes": self._bytes,
                "pushes": c.pushes,
                "duplicate_pushes": c.duplicate_pushes,
                "spooled": c.spooled,
                "dropped_spool": c.dropped_spool,
                "filtered": c.filtered,
                "sampled_out": c.sampled_out,
                "head_seq": self._head_seq,
                "tail_seq": self._head_seq + len(self._ring),
                "clients_seen": len(self._last_push),
            }

    def drain_all(self) -> list[bytes]:
        """Remove and return every buffered event (for spooling at shutdown)."""
        with self._lock:
            out = list(self._ring)
            self.counters.spooled += len(out)
            self._head_seq += len(out)
            self._ring.clear()
            self._bytes = 0
            self._oldest_since = None
            return out

    def spool_failed(self, n: int) -> None:
        """``n`` events taken by :meth:`drain_all` could not be spooled: count them lost."""
        with self._lock:
            self.counters.spooled -= n
            self.counters.dropped_spool += n
