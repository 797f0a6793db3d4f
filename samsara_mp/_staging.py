"""Staging: the bounded queue between ``record_event`` and the shipper, in each process.

``record_event`` appends an event's encoded bytes here and returns. The
shipper takes the oldest, as many as the ring has room for, and puts back
what the ring did not take, so a burst waits here (backpressure) instead of
overflowing the shared ring. Staging is bounded in events and in bytes; past
either bound its oldest are dropped and counted (``dropped``). Its counts are
cumulative totals, reported with every push as they are (docs/design.md,
"Staging and backpressure").
"""

from __future__ import annotations

import threading
import time
from collections import deque
from itertools import islice

__all__ = ["Staging", "Push"]


class Push:
    """A batch taken from staging; ``seq`` makes a resend idempotent."""

    __slots__ = ("seq", "payloads", "sent")

    def __init__(self, seq: int, payloads: list[bytes]) -> None:
        self.seq = seq
        self.payloads = payloads
        self.sent = False  # written at least once: the publisher may hold it


class Staging:
    """Bounded drop-oldest deque of encoded events, with this process's counters."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        # Re-entrant: a signal handler that flushes may interrupt record_event.
        self.lock = threading.RLock()
        self.events: deque[bytes] = deque()
        self.nbytes = 0
        self.since = 0.0  # when the oldest staged event was staged
        self.recorded = 0  # in this process, ever
        self.dropped = 0  # dropped from staging in this process, ever
        # Never staged, so never recorded: left out by before_send or by sampling.
        self.filtered = 0
        self.sampled_out = 0
        self.push_seq = 0

    def totals(self) -> tuple[int, int, int]:
        """What a push reports: (dropped, filtered, sampled_out), cumulative."""
        return self.dropped, self.filtered, self.sampled_out

    def add(self, data: bytes) -> int:
        """Stage one event (dropping the oldest past a bound); the number now staged."""
        with self.lock:
            events = self.events
            if not events:
                self.since = time.monotonic()
            events.append(data)
            self.nbytes += len(data)
            self.recorded += 1
            n = len(events)
            if n > self.max_events or self.nbytes > self.max_bytes:
                self._trim()
                n = len(events)
            return n

    def note_left_out(self, filtered: int, sampled_out: int) -> None:
        """Count events ``record_event`` did not stage."""
        with self.lock:
            self.filtered += filtered
            self.sampled_out += sampled_out

    def _trim(self) -> None:
        events = self.events
        over = 0
        nbytes = self.nbytes
        while len(events) > 1 and (len(events) > self.max_events or nbytes > self.max_bytes):
            nbytes -= len(events.popleft())
            over += 1
        self.nbytes = nbytes
        self.dropped += over

    def __len__(self) -> int:
        return len(self.events)

    def take(self, max_bytes: int, max_events: int) -> Push | None:
        """The next push: the oldest events, at most ``max_events`` and about
        ``max_bytes`` (always one when any is staged); None when none is."""
        with self.lock:
            events = self.events
            if not events or max_events <= 0:
                return None
            n = min(len(events), max_events)
            if self.nbytes > max_bytes:
                avg = self.nbytes // len(events) + 8  # pickle framing per item
                n = max(min(n, max_bytes // avg), 1)
            if n == len(events):
                batch = list(events)
                events.clear()
                self.nbytes = 0
            else:
                batch = list(islice(events, n))
                for _ in range(n):
                    events.popleft()
                self.nbytes -= sum(map(len, batch))
                self.since = time.monotonic()
            self.push_seq += 1
            return Push(self.push_seq, batch)

    def put_back(self, payloads: list[bytes]) -> None:
        """Return events that did not go (the ring had no room, or the publisher could
        not be reached) to the front of staging, keeping the bounds."""
        if not payloads:
            return
        with self.lock:
            events = self.events
            if not events:
                self.since = time.monotonic()
            events.extendleft(reversed(payloads))
            self.nbytes += sum(map(len, payloads))
            if len(events) > self.max_events or self.nbytes > self.max_bytes:
                self._trim()

    def discard(self, push: Push | None = None) -> int:
        """Forget what is staged, and ``push`` (taken but never sent), counting them as
        dropped; the number of events discarded."""
        with self.lock:
            n = len(self.events)
            self.events.clear()
            self.nbytes = 0
            if push is not None:
                n += len(push.payloads)
            self.dropped += n
            return n
