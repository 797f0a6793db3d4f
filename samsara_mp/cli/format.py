"""How ``samsara-mp status`` prints what it fetched: a table, JSON, or the Prometheus text format
(written by prometheus_client through samsara_mp.metrics, as a publisher's ``/metrics`` is).
It only turns stats into text; cli.status fetches them and decides the exit code."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["format_stats", "format_survey", "prometheus", "render_stats", "render_survey", "watch_frame"]


def _when(ts: object) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    ago = max(time.time() - ts, 0.0)
    return f"{datetime.fromtimestamp(ts).isoformat(sep=' ', timespec='seconds')} ({ago:.1f}s ago)"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_stats(stats: dict[str, Any]) -> str:
    """The human table of a publisher's stats."""
    raw, sent = int(stats.get("bytes_raw", 0)), int(stats.get("bytes_sent", 0))
    ratio = f" ({raw / sent:.1f}x)" if sent else ""
    error = stats.get("last_error")
    rows = [
        ("channel", stats.get("channel", "?")),
        ("url", stats.get("url", "?")),
        ("publisher_pid", stats.get("publisher_pid", "?")),
        ("uptime", _duration(float(stats.get("uptime_s", 0.0)))),
        # The publisher counts the connection this query came on.
        ("connected_clients", max(int(stats.get("connected_clients", 1)) - 1, 0)),
        ("recorded", f"{stats.get('recorded', 0):,}"),
        ("delivered", f"{stats.get('delivered', 0):,}"),
        ("dropped_overflow", f"{stats.get('dropped_overflow', 0):,}"),
        ("rejected", f"{stats.get('rejected', 0):,}"),
        # Never recorded: left out by the workers' before_send and sampling.
        ("filtered", f"{stats.get('filtered', 0):,}"),
        ("sampled_out", f"{stats.get('sampled_out', 0):,}"),
        ("buffered", f"{stats.get('buffered', 0):,}"),
        ("spooled", f"{stats.get('spooled', 0):,}"),
        ("restored", f"{stats.get('restored', 0):,}"),
        ("dropped_spool", f"{stats.get('dropped_spool', 0):,}"),
        ("spool_pending", f"{stats.get('spool_pending', 0):,} events, "
                          f"{stats.get('spool_bytes', 0):,} bytes on disk"
                          + (f", {stats['spool_errors']:,} write errors" if stats.get("spool_errors") else "")
                          + (f", {stats['spool_corrupt']:,} damaged spans skipped"
                             if stats.get("spool_corrupt") else "")),
        ("batches", f"{stats.get('batches', 0):,}"),
        ("bytes_raw/sent", f"{raw:,} / {sent:,}{ratio}"),
        ("retries", f"{stats.get('retries', 0):,}"),
        ("last_error", f"{error} at {_when(stats.get('last_error_at'))}" if error else "none"),
        ("last_success_at", _when(stats.get("last_success_at"))),
        ("credentials", f"REFUSED (HTTP 401/403/407) at {_when(stats.get('last_auth_failure_at'))}"
                        if stats.get("auth_failing") else "ok"),
        ("loop", "alive" if stats.get("loop_alive", True) else "DEAD"),
        ("loop_errors", f"{stats.get('loop_errors', 0):,}"),
        ("oldest_buffered", _duration(float(stats.get("oldest_buffered_age_s", 0.0)))
         + ("  STALE: no delivery for longer than a few intervals" if stats.get("stale") else "")),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def format_survey(base: Path, channels: list[dict[str, Any]]) -> str:
    """The human table of every channel under a runtime directory."""
    if not channels:
        return f"no channels under {base}"
    rows = [("channel", "pid", "uptime", "buffered", "last success", "loop")]
    for ch in channels:
        if not ch["running"]:
            rows.append((ch["channel"], "-", "-", "-", "-", "no publisher answers"))
            continue
        rows.append((
            ch["channel"], str(ch["publisher_pid"]), _duration(float(ch["uptime_s"] or 0.0)),
            f"{int(ch['buffered'] or 0):,}", _when(ch["last_success_at"]),
            "alive" if ch["loop_alive"] else "DEAD",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return f"channels under {base}:\n" + "\n".join(lines)


def prometheus(channels: list[tuple[str, dict[str, Any] | None]]) -> str:
    """The Prometheus text exposition of these channels (stats None: no publisher answers)."""
    # Imported here: prometheus_client is an optional extra, needed only by --format prometheus.
    from ..metrics import exposition

    return exposition(channels)


def render_stats(channel: str, stats: dict[str, Any], fmt: str) -> str:
    """One publisher's stats in ``fmt`` (table, json or prometheus), without a final newline."""
    if fmt == "json":
        return json.dumps(stats, sort_keys=True)
    if fmt == "prometheus":
        # The exposition ends in a newline and print adds one.
        return prometheus([(channel, stats)]).rstrip("\n")
    return format_stats(stats)


def render_survey(base: Path, channels: list[dict[str, Any]], fmt: str) -> str:
    """Every channel under ``base`` in ``fmt`` (table, json or prometheus), without a final newline."""
    if fmt == "json":
        return json.dumps({"runtime_dir": str(base), "channels": channels}, sort_keys=True)
    if fmt == "prometheus":
        return prometheus([(ch["channel"], ch.get("stats")) for ch in channels]).rstrip("\n")
    return format_survey(base, channels)


def watch_frame(text: str, fmt: str, redraw: bool) -> str:
    """What one refresh of ``status --watch`` prints for ``text``."""
    if redraw:
        return "\033[H\033[J" + time.strftime("%H:%M:%S\n") + text
    # A blank line sets tables apart; JSON stays one object a line (JSON lines).
    return text if fmt != "table" else text + "\n"
