"""The ring's side of the segment log: spilling the oldest to disk, reading batches
back into the in-flight slot, settling them, and a stopping publisher's drain
(docs/design.md, "On disk: the segment log"). Runs under the ring's lock."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from ._batch import Batch

if TYPE_CHECKING:
    from ._segment_file import Position
    from ._segment_log import SegmentLog
    from .ledger import Counters, OwnerRuns

__all__ = ["DiskSide"]

log = logging.getLogger("samsara_mp")


class DiskSide:
    """What the ring does with the segment log; mixed into :class:`Ring`."""

    spool: SegmentLog | None
    counters: Counters
    in_flight: Batch | None
    max_size: int
    _spill: bool
    _spool_off_until: float
    _spool_error_logged: float
    _ring: deque[bytes]
    _head_seq: int
    _bytes: int
    _lock: threading.Lock
    _changed: threading.Condition
    _clock: Callable[[], float]
    _flight_since: float | None
    _owners: OwnerRuns

    def _pop_head(self, n: int) -> list[bytes]:
        raise NotImplementedError

    def _flight_to_disk(self) -> None:
        """Write the ring batch in flight to the spool, and keep it in flight as a batch
        read from there (settled on disk); left as it is if it cannot be written whole."""
        assert self.spool is not None and self.in_flight is not None
        flight = self.in_flight
        positions: list[Position] = []
        try:
            written, evicted_own, evicted_inherited, error = self.spool.append(flight.payloads, positions)
        except OSError:
            return
        self._count_evicted(evicted_own, evicted_inherited)
        if error is not None or written != len(flight.payloads):
            # A partial copy: marked settled, so it is never read back; the batch stays
            # in memory as it was.
            self.spool.settle_many(positions)
            return
        self.counters.spooled += written
        for rec, k in flight.owners:
            if rec is not None:
                rec.held -= k
                rec.spilled += k
        self._bytes -= flight.nbytes
        # The same object: the publish loop may be sending it right now, and settles it.
        flight.owners, flight.positions, flight.inherited = [], positions, [False] * written
        self.spool.in_flight = set(positions)

    def _spill_out(self, taken: list[bytes], now: float) -> None:
        assert self.spool is not None
        c = self.counters
        written, evicted_own, evicted_inherited, error = self.spool.append(taken)
        c.spooled += written
        self._count_evicted(evicted_own, evicted_inherited)
        lost = len(taken) - written
        if lost:
            c.dropped_spool += lost
        if error is None:
            return
        c.spool_errors += 1
        self._spool_off_until = now + 1.0  # tried again in a second, not at every push
        if now - self._spool_error_logged >= 10.0:
            self._spool_error_logged = now
            log.error("samsara_mp: cannot write the outage spool in %s (%s); dropping the oldest "
                      "events instead (%d now), counted as dropped_spool", self.spool.dir, error, lost)

    def _count_evicted(self, own: int, inherited: int) -> None:
        c = self.counters
        c.spool_evicted += own
        c.dropped_spool += own + inherited
        c.recorded += inherited  # an earlier publisher's, never counted here before

    def _take_spool(self, max_count: int, max_bytes: int) -> Batch | None:
        assert self.spool is not None
        payloads, positions, inherited, ends = self.spool.peek(max_count, max_bytes)
        self._count_lost_on_disk()
        if not payloads:
            self.spool.advance()
            return None
        self.in_flight = Batch(self._head_seq, payloads, full=len(payloads) >= max_count,
                               positions=positions, inherited=inherited, ends=ends)
        self.spool.in_flight = set(positions)
        self._flight_since = self._clock()
        return self.in_flight

    def _count_lost_on_disk(self) -> None:
        assert self.spool is not None
        lost, self.spool.lost_own = self.spool.lost_own, 0
        if lost:
            self._count_evicted(lost, 0)

    def _settle_spool(self, batch: Batch, delivered: Collection[int], rejected: Collection[int]) -> None:
        assert self.spool is not None and batch.positions is not None and batch.inherited is not None
        c = self.counters
        delivered = set(delivered)
        settled = sorted(delivered | set(rejected))
        self.spool.settle_many([batch.positions[i] for i in settled])
        for i in settled:
            if batch.inherited[i]:
                c.recorded += 1
                c.spooled += 1
                c.spool_inherited += 1
            c.restored += 1
            if i in delivered:
                c.delivered += 1
            else:
                c.rejected += 1
        self.spool.advance(batch.ends)
        self._count_lost_on_disk()
        done = set(settled)
        left = [i for i in range(len(batch.payloads)) if i not in done]
        if left:
            self.in_flight = Batch(batch.first_seq, [batch.payloads[i] for i in left], full=batch.full,
                                   positions=[batch.positions[i] for i in left],
                                   inherited=[batch.inherited[i] for i in left], ends=batch.ends)
        else:
            self.in_flight = None
        self.spool.in_flight = set(self.in_flight.positions or ()) if self.in_flight else set()

    # ---- the spool ----
    def attach_spool(self, spool: SegmentLog, overflow: str) -> None:
        """Read ``spool`` first from now on; write to it on overflow with overflow="spool"."""
        with self._lock:
            self.spool = spool
            self._spill = overflow == "spool"

    @property
    def spilling(self) -> bool:
        return self._spill

    def spool_pending(self) -> bool:
        return self.spool is not None and not self.spool.empty()

    def sync_spool(self) -> None:
        if self.spool is not None:
            with self._lock:
                self.spool.sync()

    def close_spool(self) -> None:
        if self.spool is not None:
            with self._lock:
                self.spool.close()

    def drain_to(self, spool: SegmentLog | None) -> tuple[int, OSError | None]:
        """At shutdown: move every buffered event (in flight first) to ``spool``;
        ``(events written, error)``. What could not be written (all of it, without a
        spool) is counted dropped_spool."""
        with self._lock:
            flight = self.in_flight
            out: list[bytes] = []
            owners: list[list[Any]] = []
            if flight is not None and flight.positions is None:
                out.extend(flight.payloads)
                owners.extend(flight.owners)
                self.in_flight = None
            elif flight is not None and self.spool is not None:
                self.in_flight = None  # still on disk: nothing to write again
                self.spool.in_flight = set()
            n = len(self._ring)
            owners.extend(self._owners.take(n))
            out.extend(self._pop_head(n))
            self._bytes = 0
            for rec, k in owners:  # none of it is in memory any more
                if rec is not None:
                    rec.held -= k
            c = self.counters
            if spool is None:
                c.dropped_spool += len(out)
                _charge(owners)
                return 0, None
            self.spool = spool
            if not out:
                return 0, None
            try:
                written, evicted_own, evicted_inherited, error = spool.append(out)
            except OSError as exc:
                written, evicted_own, evicted_inherited, error = 0, 0, 0, exc
            c.spooled += written
            self._count_evicted(evicted_own, evicted_inherited)
            c.dropped_spool += len(out) - written
            if written < len(out):
                _charge(owners)
            self._changed.notify_all()
            return written, error



def _charge(owners: list[list[Any]]) -> None:
    """Some of these clients' events could not be kept: each one's next flush says so
    (which of them were lost is not known, so every one of them is told)."""
    for rec, k in owners:
        if rec is not None:
            rec.lost += k
