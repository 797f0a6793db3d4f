"""The channel's counters and the accounting invariant, in one place.

Every way an event leaves the system is a named counter here, and no counter
is ever decreased (``buffered`` and ``spool_pending`` are fills, computed).
At any quiet moment (docs/design.md, "Accounting")::

    recorded = delivered + rejected + dropped_buffer + dropped_staging
               + dropped_spool + buffered + staged + spool_pending

``recorded`` counts what workers reported (events handed to the ring, and
events their staging dropped) plus what an earlier publisher left on disk,
counted when it is read back or evicted. The per-client part remembers what
each worker last reported, so a report is a cumulative total: a resent push
cannot count anything twice, and nothing needs undoing.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

__all__ = ["Counters", "ClientRecord", "Ledger", "OwnerRuns", "MAX_REMEMBERED_CLIENTS", "unaccounted"]

# Workers are recycled (gunicorn, Celery): each new process is a new client, so
# the table of clients is bounded; a forgotten client's counts stay in the totals.
MAX_REMEMBERED_CLIENTS = 10_000
_MIN_GRANT = 64


class Counters:
    """Monotonic counters of one channel."""

    __slots__ = (
        "recorded", "received", "delivered", "rejected", "dropped_buffer", "dropped_staging",
        "spooled", "restored", "spool_evicted", "spool_inherited", "dropped_spool", "spool_errors",
        "pushes", "duplicate_pushes", "refused_events", "filtered", "sampled_out",
    )
    recorded: int
    received: int
    delivered: int
    rejected: int
    dropped_buffer: int
    dropped_staging: int
    spooled: int
    restored: int
    spool_evicted: int
    spool_inherited: int
    dropped_spool: int
    spool_errors: int
    pushes: int
    duplicate_pushes: int
    refused_events: int
    filtered: int
    sampled_out: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class ClientRecord:
    """What the ring knows of one worker process's client."""

    __slots__ = ("last_seq", "last_taken", "dropped_staging", "filtered", "sampled_out", "taken",
                 "held", "lost", "spilled", "refused_at")

    def __init__(self) -> None:
        self.last_seq = -1  # the newest push taken, and how many of its events were
        self.last_taken = 0
        # The client's cumulative totals, as last reported.
        self.dropped_staging = 0
        self.filtered = 0
        self.sampled_out = 0
        self.taken = 0  # events of it the ring has taken, ever
        self.held = 0  # of those, in the ring or in flight now
        self.lost = 0  # of those, dropped by the ring for lack of room
        self.spilled = 0  # of those, moved to the spool on disk
        self.refused_at = -1e9  # when a push of it last found too little room


class Ledger:
    """The counters and the table of clients (bounded, least recently heard first)."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.clients: OrderedDict[str, ClientRecord] = OrderedDict()
        self.active: dict[int, ClientRecord] = {}

    def client(self, client_id: str) -> ClientRecord:
        """The record of ``client_id``, made if new, moved to the newest end."""
        rec = self.clients.get(client_id)
        if rec is None:
            rec = self.clients[client_id] = ClientRecord()
            if len(self.clients) > MAX_REMEMBERED_CLIENTS:
                self._forget_one()
        else:
            self.clients.move_to_end(client_id)
        return rec

    def _forget_one(self) -> None:
        # The oldest client with nothing in the ring; its counts stay in the totals.
        for cid, rec in self.clients.items():
            if not rec.held:
                del self.clients[cid]
                return

    def report(self, rec: ClientRecord, totals: tuple[int, int, int]) -> None:
        """A client's cumulative (dropped_staging, filtered, sampled_out): count what is new."""
        dropped, filtered, sampled = totals
        c = self.counters
        if dropped > rec.dropped_staging:
            c.dropped_staging += dropped - rec.dropped_staging
            c.recorded += dropped - rec.dropped_staging
            rec.dropped_staging = dropped
        if filtered > rec.filtered:
            c.filtered += filtered - rec.filtered
            rec.filtered = filtered
        if sampled > rec.sampled_out:
            c.sampled_out += sampled - rec.sampled_out
            rec.sampled_out = sampled

    def room(self, rec: ClientRecord, free: int, max_size: int, spill: bool, now: float) -> int:
        """How many more events ``rec`` may push: its fair share of ``max_size``, less what
        it holds, within what is ``free``. With a spool (``spill``) the overflow goes to
        disk (or, while the disk fails, is dropped as the oldest): a push never waits for
        the disk, so the share alone counts."""
        waiting = rec.held or now - rec.refused_at < 1.0
        active = self.active_clients(now) + (0 if waiting else 1)
        share = max(max_size // max(active, 1), 1)
        if spill:
            return share
        room = min(free, share - rec.held)
        if room <= 0:
            return 0
        # Never less than a few dozen while there is any room: one push of them is
        # cheaper than many tiny ones.
        return min(max(room, min(_MIN_GRANT, free)), free)

    def mark_active(self, rec: ClientRecord) -> None:
        """``rec`` holds events, or was just refused room: it counts for the shares."""
        self.active[id(rec)] = rec

    def active_clients(self, now: float) -> int:
        """Clients that hold events in the ring, or were refused room within a second
        (a worker waiting for room counts, so it is not starved by a busy one). Only
        the clients marked active are looked at, not every client remembered."""
        active = self.active
        for key in [k for k, rec in active.items() if not rec.held and now - rec.refused_at >= 1.0]:
            del active[key]
        return len(active)


class OwnerRuns:
    """Whose each event of the ring is, as runs of ``[client record, count]``, oldest first
    (a push is one run): the ring drops or hands over the oldest, and each client's
    ``held`` (and ``lost``) follow."""

    def __init__(self) -> None:
        self.runs: deque[list[Any]] = deque()

    def append(self, rec: ClientRecord | None, n: int) -> None:
        runs = self.runs
        if runs and runs[-1][0] is rec:
            runs[-1][1] += n
        else:
            runs.append([rec, n])

    def release(self, n: int, lost: bool = False) -> None:
        """The ``n`` oldest leave the ring for good (``lost``: dropped for lack of room)."""
        for rec, k in self.take(n):
            if rec is not None:
                rec.held -= k
                if lost:
                    rec.lost += k

    def spill(self, n: int) -> None:
        """The ``n`` oldest move to the spool on disk: no longer held in memory."""
        for rec, k in self.take(n):
            if rec is not None:
                rec.held -= k
                rec.spilled += k

    def take(self, n: int) -> list[list[Any]]:
        """The runs of the ``n`` oldest, moved out (into a batch in flight: still held)."""
        runs = self.runs
        out: list[list[Any]] = []
        while n:
            run = runs[0]
            k = min(n, run[1])
            out.append([run[0], k])
            run[1] -= k
            n -= k
            if not run[1]:
                runs.popleft()
        return out


def unaccounted(snap: dict[str, Any]) -> int:
    """``recorded`` less every way out and every fill: 0 when the books balance."""
    return int(snap["recorded"]) - sum(int(snap.get(k, 0)) for k in (
        "delivered", "rejected", "dropped_buffer", "dropped_staging", "dropped_spool",
        "buffered", "staged", "spool_pending"))
