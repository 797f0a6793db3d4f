"""Process identity: a pid and its start time from ``/proc/<pid>/stat``, so that a
reused pid is not taken for the process a client saw (a flush's publishers, see
docs/design.md)."""

from __future__ import annotations

import os

__all__ = ["process_start", "process_running"]


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat after the command name (state first), None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name may hold spaces and parentheses: split after its last ")".
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None when unknown."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def process_running(pid: int, start: int | None) -> bool:
    """Process ``pid`` (started at ``start``, when known) exists and has not ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc here: it exists
    try:
        # A zombie has ended: only its parent has not reaped it yet.
        return fields[0] != b"Z" and (start is None or int(fields[19]) == start)
    except (IndexError, ValueError):
        return True
