"""Staging: the small per-process queue between ``record_event`` and the shipper.

``record_event`` appends an event's encoded bytes here and returns; the
shipper takes pushes from the front. Staging is bounded in events
(``staging_size``) and in bytes (``staging_bytes``), dropping the oldest past
either bound and counting them, so memory stays bounded while the publisher
is unreachable, and the default bound still holds what a busy loop records
while a cold channel's first publisher starts. It also keeps the counts not
yet reported to the publisher (recorded, dropped, and the events
``before_send`` filtered out or sampling left out), which travel with the
next push.
"""

from __future__ import annotations

import threading
import time
from collections import deque

__all__ = ["Staging", "Push"]


class Push:
    """A batch taken from staging, with the counts it reports; ``seq`` makes a resend idempotent."""

    __slots__ = ("seq", "payloads", "recorded", "dropped", "filtered", "sampled_out", "sent")

    def __init__(
        self, seq: int, payloads: list[bytes], recorded: int, dropped: int,
        filtered: int = 0, sampled_out: int = 0,
    ) -> None:
        self.seq = seq
        self.payloads = payloads
        self.recorded = recorded
        self.dropped = dropped
        self.filtered = filtered
        self.sampled_out = sampled_out
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
        self.unreported_recorded = 0
        self.unreported_dropped = 0
        # Never staged, so never recorded: left out by before_send or by sampling.
        self.filtered = 0
        self.sampled_out = 0
        self.unreported_filtered = 0
        self.unreported_sampled_out = 0
        self.push_seq = 0

    def add(self, data: bytes) -> int:
        """Stage one event (dropping the oldest past a bound); the number now staged."""
        with self.lock:
            events = self.events
            if not events:
                self.since = time.monotonic()
            events.append(data)
            self.nbytes += len(data)
            self.recorded += 1
            self.unreported_recorded += 1
            n = len(events)
            if n > self.max_events or self.nbytes > self.max_bytes:
                self._trim()
                n = len(events)
            return n

    def note_left_out(self, filtered: int, sampled_out: int, report: bool = True) -> None:
        """Count events ``record_event`` did not stage; ``report``: tell the publisher too."""
        with self.lock:
            self.filtered += filtered
            self.sampled_out += sampled_out
            if report:
                self.unreported_filtered += filtered
                self.unreported_sampled_out += sampled_out

    def _trim(self) -> None:
        events = self.events
        over = 0
        nbytes = self.nbytes
        while len(events) > 1 and (len(events) > self.max_events or nbytes > self.max_bytes):
            nbytes -= len(events.popleft())
            over += 1
        self.nbytes = nbytes
        self.dropped += over
        self.unreported_dropped += over

    def __len__(self) -> int:
        return len(self.events)

    def has_work(self) -> bool:
        """Events or counts wait to be reported."""
        return bool(self.events or self.unreported_dropped or self.unreported_filtered
                    or self.unreported_sampled_out)

    def take(self, max_bytes: int, min_events: int) -> Push | None:
        """The next push: the oldest events up to ``max_bytes`` (at least
        ``min_events`` when staged), with the counts not reported yet; None
        when there is nothing to report."""
        with self.lock:
            events = self.events
            if not events and not (self.unreported_dropped or self.unreported_filtered
                                   or self.unreported_sampled_out):
                return None
            n = len(events)
            if n and self.nbytes > max_bytes:
                avg = self.nbytes // n + 8  # pickle framing per item
                n = min(n, max(min_events, max_bytes // avg))
            if n == len(events):
                batch = list(events)
                events.clear()
                self.nbytes = 0
            else:
                batch = [events.popleft() for _ in range(n)]
                self.nbytes -= sum(map(len, batch))
                self.since = time.monotonic()
            # Every event still staged is recorded but not yet reported.
            recorded = self.unreported_recorded - len(events)
            dropped = self.unreported_dropped
            filtered, sampled_out = self.unreported_filtered, self.unreported_sampled_out
            self.unreported_recorded = len(events)
            self.unreported_dropped = self.unreported_filtered = self.unreported_sampled_out = 0
            self.push_seq += 1
            return Push(self.push_seq, batch, recorded, dropped, filtered, sampled_out)

    def put_back(self, push: Push) -> None:
        """Return a push that never left to the front of staging, keeping the bounds."""
        with self.lock:
            events = self.events
            if not events:
                self.since = time.monotonic()
            events.extendleft(reversed(push.payloads))
            self.nbytes += sum(map(len, push.payloads))
            self.unreported_recorded += push.recorded
            self.unreported_dropped += push.dropped
            self.unreported_filtered += push.filtered
            self.unreported_sampled_out += push.sampled_out
            if self.push_seq == push.seq:
                self.push_seq -= 1
            if len(events) > self.max_events or self.nbytes > self.max_bytes:
                self._trim()

    def discard(self, push: Push | None = None) -> int:
        """Forget what is staged, and ``push`` (one taken but never sent), counting
        them as dropped, also in the counts the publisher has not been told; the
        number of events discarded."""
        with self.lock:
            n = len(self.events)
            self.events.clear()
            self.nbytes = 0
            if push is not None:
                n += len(push.payloads)
                self.unreported_recorded += push.recorded
                self.unreported_dropped += push.dropped
                self.unreported_filtered += push.filtered
                self.unreported_sampled_out += push.sampled_out
            self.dropped += n
            self.unreported_dropped += n
            return n
