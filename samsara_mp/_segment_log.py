"""The one on-disk format for events: a segmented, checksummed log.

The outage spool (``overflow="spool"``) and a stopping publisher's drain both
append here, and a starting publisher reads what an earlier one left from the
same place, oldest first, a batch at a time (docs/design.md, "On disk").
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from ._segment_file import (
    FRAME,
    Damaged,
    Position,
    Segment,
    end_of,
    find_segments,
    load_cursor,
    save_cursor,
    scan,
    unlink,
)

__all__ = ["SegmentLog", "Position"]

log = logging.getLogger("samsara_mp")


SEGMENT_BYTES = 8 * 1024 * 1024
FSYNC_INTERVAL_S = 0.1
FSYNC_BYTES = 1024 * 1024

class SegmentLog:
    """Events that overflowed the shared buffer during an outage, oldest first.

    Records are framed ``<length u32><crc32 u32><payload>`` in segment files
    ``seg-<index>.smp`` of about :data:`SEGMENT_BYTES`. Appends go to the last
    segment, reads start at the first; a segment is deleted once every record
    in it was settled (delivered or rejected), or when the ``max_bytes`` bound
    evicts it. Data is fdatasync'ed at most every :data:`FSYNC_INTERVAL_S` or
    :data:`FSYNC_BYTES`, whichever comes first, and at every segment roll and
    close: a killed process loses nothing (the page cache has it), a power cut
    at most that window. A torn or corrupt record (bad length or checksum)
    ends the reading of its segment: the rest of it is skipped, logged and
    counted in :attr:`corrupt` / :attr:`corrupt_bytes`, and the next segment
    is read.

    Not thread-safe: the ring calls it under its lock.
    """

    def __init__(self, directory: str | Path, max_bytes: int,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        # Several segments fit the bound, so that eviction can drop the oldest whole one.
        self.segment_bytes = max(min(segment_bytes, max_bytes // 8), 4096)
        self.segments: list[Segment] = []
        self._fd: int | None = None  # the last segment's, when it is ours
        self._next_index = 0
        self._unsynced = 0
        self._synced_at = time.monotonic()
        # The read cursor: the next record of segments[0].
        self._rec = 0
        self._off = 0
        self._presettled: set[Position] = set()
        self.in_flight: set[Position] = set()  # read into the publisher's in-flight batch
        self.corrupt = 0  # damaged spans skipped
        self.corrupt_bytes = 0
        self.evicted_segments = 0
        self.lost_own = 0  # records of ours lost to outside damage (read by the buffer)

    # ---- open ----
    def open(self) -> None:
        """Create the directory (0700) and take over the segments an earlier publisher left."""
        from .channel import ensure_private_dir

        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ensure_private_dir(self.dir, "outage spool directory")
        found = find_segments(self.dir)
        self.segments = [s for s in found if s.size > 0]
        for s in found:
            if s.size == 0:
                unlink(s.path)
        if found:
            self._next_index = found[-1].index + 1
        self._load_cursor()
        if self.segments:
            log.info("samsara_mp: resuming an outage spool of %d segments (%d bytes) in %s",
                     len(self.segments), self.nbytes, self.dir)

    def _load_cursor(self) -> None:
        first = self.segments[0] if self.segments else None
        self._rec, self._off = load_cursor(self.dir, first)

    def _save_cursor(self) -> None:
        first = self.segments[0] if self.segments else None
        save_cursor(self.dir, first, self._rec, self._off)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.segments)

    def empty(self) -> bool:
        """Nothing left to read (the cursor is at the end of the last segment)."""
        if not self.segments:
            return True
        if len(self.segments) == 1 and self._off >= self.segments[0].size:
            return True
        return False

    # ---- write ----
    def append(self, payloads: list[bytes], positions: list[Position] | None = None
               ) -> tuple[int, int, int, OSError | None]:
        """Append records, oldest first; ``(written, evicted_own, evicted_inherited, error)``.

        Old segments are evicted to keep within ``max_bytes``; events more than
        the whole bound at once lose their oldest. When a write fails (ENOSPC,
        EFBIG...) the rest is not written, the segment is cut back to its last
        whole record and ``error`` says why; ``written`` counts what is on disk.
        ``positions``, when given, gets where each written record is.
        """
        frames = [FRAME.pack(len(p), zlib.crc32(p)) + p for p in payloads]
        need = sum(map(len, frames))
        while frames and need > self.max_bytes:
            need -= len(frames.pop(0))
        evicted_own = evicted_inh = 0
        while self.nbytes + need > self.max_bytes:
            victim = self._evictable()
            if victim is None:  # not reached: with no segment left, need fits
                break
            o, i = self._evict(victim)
            evicted_own += o
            evicted_inh += i
        written: list[int] = [0]
        try:
            self._append_frames(frames, written, positions)
        except OSError as exc:
            self._maybe_sync()
            return written[0], evicted_own, evicted_inh, exc
        self._maybe_sync()
        return written[0], evicted_own, evicted_inh, None

    def _append_frames(self, frames: list[bytes], written: list[int],
                       positions: list[Position] | None) -> None:
        start = 0
        while start < len(frames):
            seg = self._writable()
            room = self.segment_bytes - seg.size
            end = start
            size = 0
            while end < len(frames) and (size + len(frames[end]) <= room or (end == start and seg.size == 0)):
                size += len(frames[end])
                end += 1
            if end == start:
                self._roll()
                continue
            self._write(seg, b"".join(frames[start:end]))
            if positions is not None:
                positions.extend((seg.index, seg.records + i) for i in range(end - start))
            seg.records += end - start
            written[0] += end - start
            start = end

    def _writable(self) -> Segment:
        if self._fd is not None and self.segments and self.segments[-1].own:
            return self.segments[-1]
        index = self._next_index
        self._next_index += 1
        path = self.dir / f"seg-{index:012d}.smp"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        seg = Segment(index, path, 0, own=True)
        self.segments.append(seg)
        return seg

    def _write(self, seg: Segment, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            try:
                os.ftruncate(self._fd, seg.size)  # never leave a torn record of ours
            except OSError as exc:
                log.error("samsara_mp: cannot cut spool segment %s back: %s", seg.path, exc)
            raise
        seg.size += len(data)
        self._unsynced += len(data)

    def _maybe_sync(self, force: bool = False) -> None:
        if self._fd is None or not self._unsynced:
            return
        now = time.monotonic()
        if force or self._unsynced >= FSYNC_BYTES or now - self._synced_at >= FSYNC_INTERVAL_S:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                log.error("samsara_mp: fdatasync of the outage spool failed: %s", exc)
            self._unsynced = 0
            self._synced_at = now

    def sync(self) -> None:
        """Called on the loop's ticks: data older than the interval reaches the disk."""
        self._maybe_sync()

    def _roll(self) -> None:
        if self._fd is not None:
            self._maybe_sync(force=True)
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._roll()

    # ---- eviction (the bound) ----
    def _evictable(self) -> Segment | None:
        # The oldest first, even when a batch read from it is in flight: those
        # events are in memory and are counted when they settle.
        for seg in self.segments:
            if seg.own and self._fd is not None and seg is self.segments[-1]:
                continue  # the one being written
            return seg
        if self.segments and self._fd is not None:
            self._roll()  # let the written one go too: the bound comes first
            return self._evictable()
        return None

    def _evict(self, seg: Segment) -> tuple[int, int]:
        """Delete ``seg``; its unsettled records as (own, inherited) counts."""
        first = seg is self.segments[0]
        rec = self._rec if first else 0
        off = self._off if first else 0
        # Records settled already, or in flight (in memory, counted when settled).
        settled_ahead = sum(1 for p in self._presettled | self.in_flight if p[0] == seg.index)
        if seg.own:
            left = seg.records - rec - settled_ahead
        else:
            left = self._count(seg, off) - settled_ahead
        self._presettled = {p for p in self._presettled if p[0] != seg.index}
        self.segments.remove(seg)
        if self._fd is not None and not self.segments:
            os.close(self._fd)
            self._fd = None
        unlink(seg.path)
        self.evicted_segments += 1
        if first:
            self._rec = self._off = 0
            self._save_cursor()
        log.warning("samsara_mp: outage spool past spool_max_bytes %d: dropped segment %s "
                    "(%d events)", self.max_bytes, seg.path.name, max(left, 0))
        return (max(left, 0), 0) if seg.own else (0, max(left, 0))

    def _count(self, seg: Segment, off: int) -> int:
        n = 0
        for _payload, _end in self._frames(seg, off, 1 << 62, 1 << 62, quiet=True):
            n += 1
        return n

    # ---- read ----
    def _frames(self, seg: Segment, off: int, max_count: int, max_bytes: int,
                quiet: bool = False) -> Iterator[tuple[bytes, int]]:
        """The whole, valid records of ``seg`` from ``off``; at the first torn or corrupt
        one the segment's size is cut there (logged and counted once, unless ``quiet``)."""
        try:
            yield from scan(seg, off, max_count, max_bytes)
        except Damaged as damage:
            self._damaged(seg, damage.offset, quiet)

    def _damaged(self, seg: Segment, off: int, quiet: bool) -> None:
        if off >= seg.size:
            return
        skipped = seg.size - off
        if not quiet:
            self.corrupt += 1
            self.corrupt_bytes += skipped
            log.error("samsara_mp: spool segment %s is torn or corrupt at byte %d: skipping its "
                      "last %d bytes", seg.path.name, off, skipped)
        seg.size = off
        if seg.own:
            # Ours are cut back on a failed write, so this is damage from outside:
            # the records past it are lost, counted by the buffer as dropped_spool.
            whole = sum(1 for _ in self._frames(seg, 0, 1 << 62, 1 << 62, quiet=True))
            self.lost_own += max(seg.records - whole, 0)
            seg.records = whole
        if self._fd is not None and seg is self.segments[-1]:
            self._roll()  # never append after a damaged spot

    def peek(self, max_count: int, max_bytes: int
             ) -> tuple[list[bytes], list[Position], list[bool], dict[Position, int]]:
        """The oldest unsettled records: payloads, positions, whether each is inherited,
        and where each ends (for :meth:`advance`)."""
        payloads: list[bytes] = []
        positions: list[Position] = []
        inherited: list[bool] = []
        ends: dict[Position, int] = {}
        taken = 0
        for i, seg in enumerate(list(self.segments)):
            rec = self._rec if i == 0 else 0
            off = self._off if i == 0 else 0
            budget = max_count - len(payloads) + len(self._presettled)
            for payload, end in self._frames(seg, off, budget, max(max_bytes - taken, 1)):
                pos = (seg.index, rec)
                rec += 1
                ends[pos] = end
                if pos in self._presettled:
                    continue
                if payloads and taken + len(payload) > max_bytes:
                    return payloads, positions, inherited, ends
                payloads.append(payload)
                positions.append(pos)
                inherited.append(not seg.own)
                taken += len(payload)
                if len(payloads) >= max_count or taken >= max_bytes:
                    return payloads, positions, inherited, ends
        return payloads, positions, inherited, ends

    def settle_many(self, positions: list[Position]) -> None:
        """Record these positions as settled (delivered or rejected); :meth:`advance`
        then moves the cursor over them. Those of an evicted segment are ignored."""
        live = {s.index for s in self.segments}
        self._presettled.update(p for p in positions if p[0] in live)

    def advance(self, ends: dict[Position, int] | None = None) -> None:
        """Move the cursor over settled records (see :meth:`_advance`) and save it."""
        before = (self.segments[0].index if self.segments else -1, self._off)
        self._advance(ends)
        if (self.segments[0].index if self.segments else -1, self._off) != before:
            self._save_cursor()

    def _advance(self, ends: dict[Position, int] | None = None) -> None:
        """Move the cursor over settled records; delete segments read to their end.

        ``ends`` gives the end offsets of records just peeked; others are found
        by reading their header."""
        ends = ends or {}
        while self.segments:
            seg = self.segments[0]
            while self._off < seg.size and (seg.index, self._rec) in self._presettled:
                pos = (seg.index, self._rec)
                end = ends.get(pos)
                if end is None:
                    end = end_of(seg, self._off)
                    if end is None:
                        break
                self._presettled.discard(pos)
                self._rec += 1
                self._off = end
            if self._off < seg.size:
                return
            if self._fd is not None and seg is self.segments[-1]:
                # The one being written, read to its end: delivered events must not stay
                # on disk (a next publisher would send them again), so the next append
                # starts a fresh segment.
                self._roll()
            self.segments.pop(0)
            self._presettled = {p for p in self._presettled if p[0] != seg.index}
            unlink(seg.path)
            self._rec = self._off = 0
