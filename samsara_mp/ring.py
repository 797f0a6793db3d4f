"""The channel's ring: the bounded buffer of encoded events in the publisher.

Workers push into its tail; the publish loop takes a batch out of its head
into the in-flight slot, and settles it there: delivered and rejected events
leave, the rest stay in flight and are sent again. ``max_size`` bounds the
ring and the slot together. Room is handed out before events arrive: each
push's answer says how many more events that client may push (its fair share
of what is free), so a burst waits in the workers' staging instead of
overflowing here. Drop-oldest remains the last resort for what arrives past
the bound, and takes only from the ring, never from the slot.

With an outage spool (``overflow="spool"``) the oldest go to disk instead of
being dropped; spooled events are older than anything in the ring, so the
loop sends them first (docs/design.md, "The ring and the in-flight slot").
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Collection, Sequence
from itertools import accumulate, islice, repeat, starmap
from typing import TYPE_CHECKING, Any

from ._batch import Batch
from ._ring_disk import DiskSide
from .ledger import ClientRecord, Ledger, OwnerRuns

if TYPE_CHECKING:
    from ._segment_log import SegmentLog

log = logging.getLogger("samsara_mp")

__all__ = ["Ring", "Batch"]

class Ring(DiskSide):
    """Bounded ring with an in-flight slot, room per client, and exact counters."""

    def __init__(self, max_size: int, clock: Callable[[], float] = time.monotonic,
                 spool: SegmentLog | None = None, overflow: str = "drop") -> None:
        self.max_size = max_size
        self.spool = spool
        self._spill = overflow == "spool" and spool is not None
        self._spool_off_until = 0.0
        self._spool_error_logged = -1e9
        self._ring: deque[bytes] = deque()
        self._owners = OwnerRuns()  # whose each event of the ring is
        self._bytes = 0
        self._head_seq = 0  # the seq of self._ring[0]
        self.in_flight: Batch | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._clock = clock
        self._oldest_since: float | None = None  # when the ring's head arrived
        self._flight_since: float | None = None  # the same, for the batch in flight
        self.ledger = Ledger()
        self.counters = self.ledger.counters

    # ---- worker side (IPC server threads) ----
    def push(self, payloads: Sequence[bytes], client_id: str = "", push_seq: int = -1,
             totals: tuple[int, int, int] = (0, 0, 0), wait: float = 0.0) -> tuple[int, int]:
        """Take the oldest of ``payloads`` that fit this client's room; ``(taken, room)``.

        ``room`` is how many more events the client may push now. A push resent
        with a seq already taken gets the first answer's count again, so a
        worker that timed out waiting cannot duplicate events. Pushes with no
        client id (the publisher's own events) take whatever room there is and
        fall back to drop-oldest. ``wait``: how long a push that finds no room at
        all waits for some."""
        with self._lock:
            c = self.counters
            rec = self.ledger.client(client_id) if client_id else None
            if rec is not None:
                self.ledger.report(rec, totals)  # counts only what is new: a resend's too
                if push_seq <= rec.last_seq:
                    c.duplicate_pushes += 1
                    return rec.last_taken, self._room(rec)
            c.pushes += 1
            n = len(payloads)
            if rec is None:
                take = n
            else:
                room = self._room(rec)
                if not room and n and wait > 0:
                    # No room: wait a little for a batch to leave, rather than have the
                    # worker ask again and again.
                    self._changed.wait_for(lambda: self._room(rec) > 0, wait)
                    room = self._room(rec)
                take = min(n, room)
                rec.last_seq, rec.last_taken = push_seq, take
                rec.taken += take
                rec.held += take
                if take < n:
                    rec.refused_at = self._clock()
                if rec.held or take < n:
                    self.ledger.mark_active(rec)
            c.refused_events += n - take
            if take:
                self._append(payloads if take == n else payloads[:take], rec)
            return take, (self._room(rec) if rec is not None else 0)

    def _append(self, payloads: Sequence[bytes], rec: ClientRecord | None) -> None:
        c = self.counters
        n = len(payloads)
        c.recorded += n
        c.received += n
        if not self._ring:
            self._oldest_since = self._clock()
        self._ring.extend(payloads)
        self._bytes += sum(map(len, payloads))
        self._owners.append(rec, n)
        over = len(self._ring) + self._flight_len() - self.max_size
        if over > 0:
            self._make_room(min(over, len(self._ring)))
        self._changed.notify_all()

    def _flight_len(self) -> int:
        """Events in flight from the ring (a batch read from the spool is still counted
        there, as ``spool_pending``, until it settles)."""
        flight = self.in_flight
        return len(flight.payloads) if flight is not None and flight.positions is None else 0

    def _room(self, rec: ClientRecord) -> int:
        """How many more events ``rec`` may push now (``Ledger.room``)."""
        free = self.max_size - len(self._ring) - self._flight_len()
        return self.ledger.room(rec, free, self.max_size, self._spill, self._clock())

    def _pop_head(self, n: int) -> list[bytes]:
        """Remove the ``n`` oldest of the ring (under the lock), releasing their owners."""
        ring = self._ring
        if n < len(ring):
            taken = [ring.popleft() for _ in range(n)]
        else:
            taken = list(ring)
            ring.clear()
        self._bytes -= sum(map(len, taken))
        self._head_seq += n
        self._oldest_since = self._clock() if ring else None
        return taken

    def _make_room(self, n: int) -> None:
        """Past the bound: the ``n`` oldest of the ring go to the spool, or are dropped."""
        now = self._clock()
        if self._spill and now >= self._spool_off_until:
            if self.in_flight is not None and self.in_flight.positions is None:
                # The batch in flight is older than what goes to disk now: it goes first,
                # so that a stop, which writes what is left at the log's end, keeps order.
                self._flight_to_disk()
            self._owners.spill(n)
            self._spill_out(self._pop_head(n), now)
            return
        self._owners.release(n, lost=True)
        self._pop_head(n)
        if self._spill:
            self.counters.dropped_spool += n  # meant for the disk, which failed a moment ago
        else:
            self.counters.dropped_buffer += n

    # ---- the publish loop's side ----
    def take(self, max_count: int, max_bytes: int) -> Batch | None:
        """The batch to send: the one in flight (sent again), else the oldest of the spool,
        else the oldest of the ring, moved into the in-flight slot; None when empty."""
        with self._lock:
            if self.in_flight is not None:
                return self.in_flight
            if self.spool is not None and not self.spool.empty():
                batch = self._take_spool(max_count, max_bytes)
                if batch is not None:
                    return batch
            ring = self._ring
            if not ring:
                return None
            n = min(len(ring), max_count)
            full = n < len(ring)
            if n == len(ring):
                payloads, nbytes = list(ring), self._bytes
            else:
                payloads = list(islice(ring, n))
                nbytes = sum(map(len, payloads))
            if nbytes > max_bytes:
                sizes = list(accumulate(map(len, payloads)))
                n = max(bisect_right(sizes, max_bytes), 1)
                del payloads[n:]
                nbytes, full = sizes[n - 1], True
            batch = Batch(self._head_seq, payloads, self._owners.take(n), nbytes, full)
            # Out of the ring, still buffered: the bytes stay counted until settled.
            if n == len(ring):
                ring.clear()
            else:
                deque(starmap(ring.popleft, repeat((), n)), 0)
            self._head_seq += n
            self._flight_since = self._oldest_since
            self._oldest_since = self._clock() if ring else None
            self.in_flight = batch
            return self.in_flight

    def settle(self, batch: Batch, delivered: Collection[int], rejected: Collection[int]) -> None:
        """Count the in-flight batch's delivered and rejected events (indexes into its
        payloads) out; the others stay in flight, in order, to be sent again."""
        with self._lock:
            if batch is not self.in_flight:
                raise ValueError("settle() of a batch that is not in flight")
            c = self.counters
            n = len(batch.payloads)
            if batch.positions is not None:
                self._settle_spool(batch, delivered, rejected)
            elif not rejected and len(delivered) == n:
                c.delivered += n
                for rec, k in batch.owners:
                    if rec is not None:
                        rec.held -= k
                self._bytes -= batch.nbytes
                self.in_flight = None
            else:
                self._settle_part(batch, set(delivered), set(rejected))
            self._changed.notify_all()

    def _settle_part(self, batch: Batch, delivered: set[int], rejected: set[int]) -> None:
        c = self.counters
        owners = batch.owner_list()
        keep: list[bytes] = []
        keep_owners: list[list[Any]] = []
        first_kept: int | None = None
        for i, payload in enumerate(batch.payloads):
            rec = owners[i]
            if i in delivered or i in rejected:
                if i in delivered:
                    c.delivered += 1
                else:
                    c.rejected += 1
                if rec is not None:
                    rec.held -= 1
                self._bytes -= len(payload)
                continue
            if first_kept is None:
                first_kept = batch.first_seq + i
            keep.append(payload)
            if keep_owners and keep_owners[-1][0] is rec:
                keep_owners[-1][1] += 1
            else:
                keep_owners.append([rec, 1])
        if keep:
            assert first_kept is not None
            self.in_flight = Batch(first_kept, keep, keep_owners, full=batch.full)
        else:
            self.in_flight = None

    # ---- state ----
    def __len__(self) -> int:
        """Events buffered: in the ring and in flight."""
        return len(self._ring) + self._flight_len()

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def tail_seq(self) -> int:
        """The seq the next pushed event will get."""
        with self._lock:
            return self._head_seq + len(self._ring)

    def flushed(self, target: int) -> bool:
        """Every event pushed before seq ``target`` has left (call under the lock via
        :meth:`wait`, or accept a racy answer)."""
        flight = self.in_flight
        if flight is not None and (flight.positions is not None or flight.first_seq < target):
            return False
        return self._head_seq >= target and not self.spool_pending()

    def oldest_age(self) -> float:
        """Seconds the oldest buffered event has waited (0 when empty)."""
        since = self._flight_since if self.in_flight is not None else self._oldest_since
        return 0.0 if since is None else self._clock() - since

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` (called under the lock) holds, or timeout."""
        with self._changed:
            return bool(self._changed.wait_for(predicate, timeout))

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def snapshot(self, client_id: str | None = None) -> dict[str, Any]:
        """Counters and fills as a plain dict; with ``client_id``, that client's own
        numbers as the ring knows them (``client``)."""
        with self._lock:
            c = self.counters
            snap: dict[str, Any] = c.as_dict()
            spool = self.spool
            snap.update(
                dropped_overflow=c.dropped_buffer + c.dropped_staging,
                buffered=len(self._ring) + self._flight_len(),
                buffered_bytes=self._bytes,
                in_flight=len(self.in_flight.payloads) if self.in_flight is not None else 0,
                max_buffer_size=self.max_size,
                spool_pending=c.spooled - c.restored - c.spool_evicted,
                spool_bytes=spool.nbytes if spool is not None else 0,
                spool_segments=len(spool.segments) if spool is not None else 0,
                spool_corrupt=spool.corrupt if spool is not None else 0,
                spool_corrupt_bytes=spool.corrupt_bytes if spool is not None else 0,
                head_seq=self._head_seq,
                tail_seq=self._head_seq + len(self._ring),
                clients_seen=len(self.ledger.clients),
            )
            if client_id is not None:
                rec = self.ledger.clients.get(client_id)
                snap["client"] = None if rec is None else {
                    "last_seq": rec.last_seq, "last_taken": rec.last_taken, "taken": rec.taken,
                    "held": rec.held, "lost": rec.lost, "spilled": rec.spilled,
                    "dropped_staging": rec.dropped_staging, "filtered": rec.filtered,
                    "sampled_out": rec.sampled_out, "room": self._room(rec),
                }
            return snap
