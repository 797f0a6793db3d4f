"""One segment file of the segment log: its record framing ``<length u32 LE><crc32 u32 LE>
<bytes>`` and reading records back, stopping at the first torn or corrupt one
(docs/design.md, "On disk: the segment log")."""

from __future__ import annotations

import logging
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Segment", "Position", "FRAME", "MAX_RECORD", "Damaged", "scan", "end_of", "unlink",
           "find_segments", "load_cursor", "save_cursor"]

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


def find_segments(directory: Path) -> list[Segment]:
    """The segment files an earlier publisher left, oldest first; any that is not ours or
    not a regular file is refused (another user could have planted it)."""
    uid = os.geteuid()
    found = []
    for path in directory.glob("seg-*.smp"):
        try:
            index = int(path.name[4:-4])
            st = os.lstat(path)
        except (ValueError, OSError):
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            log.error("samsara_mp: spool segment %s is not ours or not a file; not sending it", path)
            continue
        found.append(Segment(index, path, st.st_size, own=False))
    found.sort(key=lambda s: s.index)
    return found


# The cursor says how far the first segment was delivered, so a next publisher does not
# send it again. Written on every move and renamed into place, not fsynced: a cursor lost
# to a power cut only means duplicates.

def load_cursor(directory: Path, first: Segment | None) -> tuple[int, int]:
    """(record, offset) delivered so far in ``first``; (0, 0) when none is saved for it."""
    try:
        index, rec, off = (int(x) for x in (directory / "cursor").read_text().split())
    except (OSError, ValueError):
        return 0, 0
    if first is None or first.index != index or not 0 <= off <= first.size:
        return 0, 0
    log.info("samsara_mp: outage spool resumes at record %d of %s (delivered before)",
             rec, first.path.name)
    return rec, off


def save_cursor(directory: Path, first: Segment | None, rec: int, off: int) -> None:
    path = directory / "cursor"
    if first is None or not off:
        unlink(path)
        return
    tmp = directory / ".cursor"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{first.index} {rec} {off}\n")
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: the next publisher may resend some events
        log.warning("samsara_mp: cannot save the outage spool's cursor: %s", exc)
