"""One segment file of the segment log: its record framing ``<length u32 LE><crc32 u32 LE>
<bytes>`` and reading records back, stopping at the first torn or corrupt one
(docs/design.md, "On disk: the segment log")."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Segment", "Position", "FRAME", "MAX_RECORD", "Damaged", "scan", "end_of", "unlink"]

log = logging.getLogger("samsara_mp")


def unlink(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.error("samsara_mp: cannot remove spool file %s: %s", path, exc)
        return 0
    return 1


FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
MAX_RECORD = 64 * 1024 * 1024  # a length past this is a corrupt header, not an event
Position = tuple[int, int]  # (segment index, record number in it)


class Segment:
    """One segment file: its index, path, size of whole records, and whether this process
    wrote it (then its record count is known)."""

    __slots__ = ("index", "path", "size", "own", "records")

    def __init__(self, index: int, path: Path, size: int, own: bool) -> None:
        self.index = index
        self.path = path
        self.size = size  # bytes of whole records (own) or of the file (inherited)
        self.own = own  # written by this process: its record count is known
        self.records = 0 if own else -1




class Damaged(Exception):
    """A torn or corrupt record at ``offset``: nothing from there on is read."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


def scan(seg: Segment, off: int, max_count: int, max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """``(payload, end offset)`` of the whole, valid records of ``seg`` from ``off``, at
    most ``max_count`` and about ``max_bytes``; :class:`Damaged` at the first torn or
    corrupt record."""
    try:
        fd = os.open(seg.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        log.error("samsara_mp: cannot read spool segment %s: %s", seg.path, exc)
        raise Damaged(off) from exc
    hdr = FRAME.size
    try:
        count = taken = 0
        while off < seg.size and count < max_count and taken < max_bytes:
            want = min(max(max_bytes - taken, 1 << 16) + 4096, seg.size - off, 1 << 22)
            chunk = os.pread(fd, want, off)
            pos = 0
            while count < max_count and taken < max_bytes:
                if pos + hdr > len(chunk):
                    break
                length, crc = FRAME.unpack_from(chunk, pos)
                if length > MAX_RECORD or off + pos + hdr + length > seg.size:
                    raise Damaged(off + pos)
                if pos + hdr + length > len(chunk):
                    if pos:
                        break  # the next chunk starts with it
                    chunk = os.pread(fd, hdr + length, off)  # one record larger than a chunk
                    if len(chunk) < hdr + length:
                        raise Damaged(off)
                payload = chunk[pos + hdr:pos + hdr + length]
                if zlib.crc32(payload) != crc:
                    raise Damaged(off + pos)
                pos += hdr + length
                count += 1
                taken += length
                yield payload, off + pos
            if not pos:
                # Fewer bytes than a header left, or a read that came back short.
                raise Damaged(off)
            off += pos
    finally:
        os.close(fd)


def end_of(seg: Segment, off: int) -> int | None:
    """Where the record at ``off`` ends, from its header (it was checked when read)."""
    try:
        fd = os.open(seg.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            head = os.pread(fd, FRAME.size, off)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(head) < FRAME.size:
        return None
    end = off + FRAME.size + FRAME.unpack(head)[0]
    return end if end <= seg.size else None
