"""Spool: what a stopping publisher could not deliver in time, kept for the next one.

One file per shutdown, one encoded event per line (compact JSON never holds a
raw newline), written to a temporary name and renamed, so a reader sees whole
files only. A line that does not parse as JSON (a torn or corrupt file) is
reported and skipped; the rest of the file is still resent.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ChannelError

__all__ = ["Spool"]

log = logging.getLogger("samsara_mp")


class Spool:
    """A directory of spool files, written at shutdown and taken at start."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.corrupt_lines = 0

    def ensure(self) -> None:
        """Create the directory 0700 if absent; ``ChannelError`` unless it is ours and
        private: a directory others can write to would let them plant events that this
        publisher sends as its own."""
        from .channel import ensure_private_dir

        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # ensure_private_dir says what is wrong
        ensure_private_dir(self.dir, "spool directory")

    def write(self, payloads: Sequence[bytes]) -> Path:
        """Write one file whole (temp name, fsync, rename) or raise ``OSError`` leaving none."""
        try:
            self.ensure()
        except ChannelError as exc:
            raise OSError(errno.EACCES, str(exc)) from exc
        name = f"spool-{time.time_ns()}-{os.getpid()}.jsonl"
        tmp = self.dir / ("." + name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(b"\n".join(payloads))
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            final = self.dir / name
            os.replace(tmp, final)
        except OSError:
            _unlink(tmp)  # a full disk must not leave a torn or empty file behind
            raise
        return final

    def clean(self) -> int:
        """Remove what a failed or killed writer left (temp and empty files); how many."""
        if not self.dir.is_dir():
            return 0
        removed = 0
        for path in self.dir.glob(".spool-*"):
            removed += _unlink(path)
        for path in self.dir.glob("spool-*.jsonl"):
            try:
                empty = path.stat().st_size == 0
            except OSError:
                continue
            if empty:
                removed += _unlink(path)
        if removed:
            log.info("samsara_mp: removed %d temporary or empty spool files in %s", removed, self.dir)
        return removed

    def files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("spool-*.jsonl"))

    def take_all(self) -> Iterator[list[bytes]]:
        """Yield each spool file's valid events, oldest file first, removing the file."""
        uid = os.geteuid()
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    if os.fstat(f.fileno()).st_uid != uid:
                        log.error("samsara_mp: spool file %s is not ours; not sending it", path)
                        continue
                    data = f.read()
            except OSError as exc:
                log.error("samsara_mp: cannot read spool file %s: %s", path, exc)
                continue
            good: list[bytes] = []
            for lineno, line in enumerate(data.split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    self.corrupt_lines += 1
                    log.error("samsara_mp: skipping corrupt line %d of spool file %s", lineno, path)
                    continue
                if not isinstance(obj, dict):
                    self.corrupt_lines += 1
                    log.error("samsara_mp: skipping non-object line %d of spool file %s", lineno, path)
                    continue
                good.append(line)
            path.unlink()
            yield good


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.error("samsara_mp: cannot remove spool file %s: %s", path, exc)
        return 0
    return 1
