"""SharedBuffer: the channel's one bounded ring of encoded events.

It lives in the publisher process. Workers push batches into it over IPC; the
publish loop peeks a batch from its head, sends it, and commits the outcome.
Events leave only when delivered, rejected by the API, or dropped as the
oldest on overflow, and each way out is counted, so that at a quiet moment
``recorded = delivered + dropped_overflow + rejected + buffered + staged``.

With an outage spool (``overflow="spool"``) the oldest events move to disk
instead of being dropped, and the invariant gains the spool's terms:
``... + (spooled - restored) + dropped_spool``: ``spooled - restored`` is what
is on disk now. Events an earlier publisher left on disk are counted here as
recorded, spooled and restored (or dropped_spool) when they are read back.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Collection, Sequence
from itertools import accumulate, islice, repeat, starmap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spool import Position, SegmentSpool

log = logging.getLogger("samsara_mp")

__all__ = ["SharedBuffer", "Batch", "Counters", "MAX_REMEMBERED_CLIENTS"]

# Push sequence numbers kept for de-duplication: gunicorn and Celery recycle
# workers, and each new process is a new client, so the map must be bounded.
MAX_REMEMBERED_CLIENTS = 10_000


class Counters:
    """Monotonic counters of one channel (except ``buffered``).

    Plain slots rather than a dataclass: no ``dataclasses``/``inspect`` import
    before a new publisher serves (benchmarks/README.md, "Cold start").
    """

    # spooled: on disk or read back (eviction moves events to dropped_spool); restored: read
    # back from disk into a settled batch or the buffer; inherited: of spooled, left on
    # disk by an earlier publisher; dropped_spool: meant for disk but the spool could not
    # take or keep them; spool_errors: failed spool writes (ENOSPC, EFBIG, EIO...);
    # filtered/sampled_out: reported by workers, never recorded, counted apart.
    __slots__ = (
        "recorded",
        "received",
        "delivered",
        "dropped_overflow",
        "dropped_staging",
        "rejected",
        "duplicate_pushes",
        "spooled",
        "restored",
        "inherited",
        "dropped_spool",
        "spool_errors",
        "pushes",
        "filtered",
        "sampled_out",
    )

    recorded: int
    received: int
    delivered: int
    dropped_overflow: int
    dropped_staging: int
    rejected: int
    duplicate_pushes: int
    spooled: int
    restored: int
    inherited: int
    dropped_spool: int
    spool_errors: int
    pushes: int
    filtered: int
    sampled_out: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class Batch:
    """A run of events peeked from the head: ``payloads[i]`` has seq ``first_seq + i``.

    ``full``: it stopped at the count or byte budget, not at the buffer's end. A
    batch from the outage spool also says where each event is on disk
    (``positions``) and which an earlier publisher wrote (``inherited``).
    """

    __slots__ = ("first_seq", "payloads", "full", "positions", "inherited", "ends", "nbytes")

    def __init__(
        self, first_seq: int, payloads: list[bytes], full: bool = False,
        positions: tuple[Position, ...] | None = None, inherited: tuple[bool, ...] = (),
        ends: dict[Position, int] | None = None, nbytes: int | None = None,
    ) -> None:
        self.first_seq = first_seq
        self.payloads = payloads
        self.full = full
        self.nbytes = sum(map(len, payloads)) if nbytes is None else nbytes
        self.positions = positions
        self.inherited = inherited
        self.ends = ends

    def __repr__(self) -> str:
        return f"Batch(first_seq={self.first_seq}, events={len(self.payloads)}, full={self.full})"

    @property
    def raw_bytes(self) -> int:
        return self.nbytes


class SharedBuffer:
    """Bounded, drop-oldest ring with sequence numbers and peek/commit."""

    def __init__(self, max_size: int, clock: Any = time.monotonic,
                 spool: SegmentSpool | None = None, overflow: str = "drop") -> None:
        self._max = max_size
        # Read whenever present (an earlier publisher may have left segments);
        # written on overflow only with overflow="spool".
        self.spool = spool
        self._spill = overflow == "spool" and spool is not None
        # Head removals by overflow, to settle a batch in flight whose events left
        # the ring meanwhile: (first seq, count, how, [(segment, first record, count)]).
        self._gone: list[tuple[int, int, str, list[tuple[int, int, int]]]] = []
        self._spool_off_until = 0.0
        self._spool_error_logged = 0.0
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
                if self._spill:
                    self._spill_head(dropped)
                else:
                    self._drop_head(dropped)
            self._changed.notify_all()
            return max(dropped, 0)

    def _spill_head(self, n: int) -> None:
        """overflow="spool": move the ``n`` oldest to the outage spool (under the lock)."""
        from .spool import SpoolFull

        assert self.spool is not None
        ring = self._ring
        taken = [ring.popleft() for _ in range(n)]
        self._bytes -= sum(map(len, taken))
        first = self._head_seq
        self._head_seq += n
        self._oldest_since = self._clock() if ring else None
        c = self.counters
        now = self._clock()
        if now < self._spool_off_until:
            c.dropped_spool += n  # a write failed a moment ago: drop-oldest meanwhile
            self._gone.append((first, n, "dropped_spool", []))
            return
        # More than the whole bound at once: the newest of them are kept.
        fit, room = len(taken), self.spool.max_bytes
        while fit and room - len(taken[fit - 1]) - 8 >= 0:
            fit -= 1
            room -= len(taken[fit]) + 8
        if fit:
            c.dropped_spool += fit
            self._gone.append((first, fit, "dropped_spool", []))
            taken = taken[fit:]
            first += fit
            n -= fit
            if now - self._spool_error_logged >= 10.0:
                self._spool_error_logged = now
                log.warning("samsara_mp: %d events overflowed at once, more than spool_max_bytes "
                            "%d; dropped the oldest %d, counted as dropped_spool",
                            fit + n, self.spool.max_bytes, fit)
            if not taken:
                return
        try:
            runs, evicted_own, evicted_inherited, error = self.spool.append(taken)
        except SpoolFull as exc:
            c.dropped_spool += n
            self._gone.append((first, n, "dropped_spool", []))
            if now - self._spool_error_logged >= 10.0:
                self._spool_error_logged = now
                log.warning("samsara_mp: outage spool full (%s); dropped %d events, counted as "
                            "dropped_spool", exc, n)
            return
        written = sum(r[2] for r in runs)
        c.spooled += written
        if written:
            self._gone.append((first, written, "spooled", runs))
        self._account_evicted(evicted_own, evicted_inherited)
        if error is not None:
            lost = n - written
            c.dropped_spool += lost
            c.spool_errors += 1
            self._gone.append((first + written, lost, "dropped_spool", []))
            self._spool_off_until = now + 1.0  # tried again in a second, not at every push
            if now - self._spool_error_logged >= 10.0:
                self._spool_error_logged = now
                log.error("samsara_mp: cannot write the outage spool in %s (%s); dropping the "
                          "oldest events instead (%d now), counted as dropped_spool",
                          self.spool.dir, error, lost)

    def _account_evicted(self, own: int, inherited: int) -> None:
        c = self.counters
        c.spooled -= own
        c.dropped_spool += own + inherited
        c.recorded += inherited  # never counted here before: an earlier publisher's

    def _settle_gone(self, seq: int, outcome: str) -> None:
        """An event that overflow took out of the ring while its batch was in flight was
        delivered or rejected after all: move it to that count."""
        c = self.counters
        setattr(c, outcome, getattr(c, outcome) + 1)
        for first, n, how, runs in self._gone:  # noqa: B007 - the match is used below
            if first <= seq < first + n:
                break
        else:
            c.dropped_overflow -= 1
            return
        if how == "dropped_spool":
            c.dropped_spool -= 1
            return
        k = seq - first
        for index, rec, count in runs:
            if k < count:
                assert self.spool is not None
                if self.spool.presettle((index, rec + k)):
                    c.restored += 1  # it will not be read back: settled already
                else:
                    c.dropped_spool -= 1  # its segment was evicted and counted so
                    c.spooled += 1
                    c.restored += 1
                return
            k -= count

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
            # The whole buffer is one pass over its events fewer: its size is kept.
            nbytes = self._bytes if start == 0 and not full else sum(map(len, out))
            if nbytes > max_bytes:
                sizes = list(accumulate(map(len, out)))
                keep = max(bisect_right(sizes, max_bytes), 1)
                del out[keep:]
                nbytes = sizes[keep - 1]
                full = True
            return Batch(self._head_seq + start, out, full, nbytes=nbytes)

    def wait(self, predicate: Any, timeout: float) -> bool:
        """Block until ``predicate()`` (called under the lock) holds, or timeout."""
        with self._changed:
            return bool(self._changed.wait_for(predicate, timeout))

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def commit(self, batch: Batch, delivered: Collection[int], rejected: Collection[int]) -> None:
        """Settle a sent batch: indexes into ``batch.payloads`` delivered or rejected.

        Events not named stay in the buffer, in order. Events of the batch that
        overflow dropped while it was in flight were counted as dropped; if
        the API took or refused them after all, they are moved to that count.
        """
        n = len(batch.payloads)
        # The common case, a whole batch delivered, needs no sets of its indexes
        # (5,000 ints hashed per batch): ``delivered`` and ``rejected`` are distinct
        # indexes, a partition of part of the batch (delivery.settle).
        whole = n and not rejected and len(delivered) == n
        if batch.positions is not None:
            self._commit_spool(batch, set(delivered), set(rejected))
            return
        with self._lock:
            # Earlier batches are settled: what overflow took before this one is no longer needed.
            if self._gone:
                self._gone = [g for g in self._gone if g[0] + g[1] > batch.first_seq]
            if whole and self._head_seq == batch.first_seq and len(self._ring) >= n:
                # The common case, a whole batch delivered and nothing dropped in flight.
                ring = self._ring
                if len(ring) == n:
                    ring.clear()
                    self._oldest_since = None
                else:  # n poplefts at C speed
                    deque(starmap(ring.popleft, repeat((), n)), 0)
                self._bytes -= batch.nbytes
                self._head_seq += n
                self.counters.delivered += n
                self._changed.notify_all()
                return
        delivered = set(delivered)
        rejected = set(rejected)
        settled = delivered | rejected
        if not settled:
            return
        with self._lock:
            c = self.counters
            gone = min(max(self._head_seq - batch.first_seq, 0), len(batch.payloads))
            for i in range(gone):
                if i in delivered:
                    self._settle_gone(batch.first_seq + i, "delivered")
                elif i in rejected:
                    self._settle_gone(batch.first_seq + i, "rejected")
            if gone and self.spool is not None:
                self.spool.advance()
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

    # ---- the outage spool ----
    def attach_spool(self, spool: SegmentSpool, overflow: str) -> None:
        """Read ``spool`` first from now on; write to it on overflow with overflow="spool"."""
        with self._lock:
            self.spool = spool
            self._spill = overflow == "spool"

    @property
    def spilling(self) -> bool:
        """overflow="spool": the oldest go to disk on overflow."""
        return self._spill

    def spool_pending(self) -> bool:
        """Events wait in the outage spool (call under the lock, or accept a racy answer)."""
        return self.spool is not None and not self.spool.empty()

    def peek_spool(self, max_count: int, max_bytes: int) -> Batch:
        """The oldest events of the outage spool (older than anything in the ring)."""
        with self._lock:
            assert self.spool is not None
            payloads, positions, inherited, ends = self.spool.peek(max_count, max_bytes)
            self._take_lost()
            if not payloads:
                self.spool.advance()
            return Batch(self._head_seq, payloads, full=len(payloads) >= max_count,
                         positions=tuple(positions), inherited=tuple(inherited), ends=ends)

    def _take_lost(self) -> None:
        assert self.spool is not None
        lost, self.spool.lost_own = self.spool.lost_own, 0
        if lost:
            self._account_evicted(lost, 0)

    def _commit_spool(self, batch: Batch, delivered: set[int], rejected: set[int]) -> None:
        assert self.spool is not None and batch.positions is not None
        with self._lock:
            c = self.counters
            settled = sorted(delivered | rejected)
            on_disk = self.spool.settle_many([batch.positions[i] for i in settled])
            for i, ok in zip(settled, on_disk, strict=True):
                if not ok:
                    # Its segment was evicted while the batch was in flight and its events
                    # counted as dropped_spool (and, an earlier publisher's, as recorded):
                    # they arrived after all.
                    c.dropped_spool -= 1
                    c.spooled += 1
                    if batch.inherited[i]:
                        c.inherited += 1
                elif batch.inherited[i]:
                    c.recorded += 1
                    c.spooled += 1
                    c.inherited += 1
                c.restored += 1
                if i in delivered:
                    c.delivered += 1
                else:
                    c.rejected += 1
            self.spool.advance(batch.ends)
            self._take_lost()
            self._changed.notify_all()

    def restored_from_disk(self, n: int) -> None:
        """``n`` events an earlier publisher spooled at shutdown were pushed back into the ring."""
        with self._lock:
            self.counters.spooled += n
            self.counters.restored += n
            self.counters.inherited += n

    def sync_spool(self) -> None:
        if self.spool is not None:
            with self._lock:
                self.spool.sync()

    def close_spool(self) -> None:
        if self.spool is not None:
            with self._lock:
                self.spool.close()

    def snapshot(self, client_id: str | None = None) -> dict[str, Any]:
        """Counters plus the current fill, as a plain dict; with ``client_id``, also
        the last push seq taken from that client (-1 for none)."""
        with self._lock:
            c = self.counters
            snap = {
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
                "restored": c.restored,
                "spool_inherited": c.inherited,
                "dropped_spool": c.dropped_spool,
                "filtered": c.filtered,
                "sampled_out": c.sampled_out,
                "spool_pending": c.spooled - c.restored,
                "spool_errors": c.spool_errors,
                "spool_bytes": self.spool.nbytes if self.spool is not None else 0,
                "spool_segments": len(self.spool.segments) if self.spool is not None else 0,
                "spool_corrupt": self.spool.corrupt if self.spool is not None else 0,
                "spool_corrupt_bytes": self.spool.corrupt_bytes if self.spool is not None else 0,
                "head_seq": self._head_seq,
                "tail_seq": self._head_seq + len(self._ring),
                "clients_seen": len(self._last_push),
            }
            if client_id is not None:
                snap["client_last_push"] = self._last_push.get(client_id, -1)
            return snap

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
