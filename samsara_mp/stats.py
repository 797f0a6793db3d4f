"""Client-stats events: the publisher reporting on itself, as Samsara events.

With ``send_client_stats=True`` the publisher records, every
``stats_interval`` ms, one event named ``samsara.client.stats`` (Samsara's
dotted ``subject.detail`` naming) whose properties say whether
``max_buffer_size`` and ``publish_interval`` fit the load: how full the
buffer is, how much was delivered and dropped since the last report, and how
many tries failed. They go through the same buffer as every other event and
are counted apart as ``stats_events``.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from .config import Config
from .helpers import current_time_millis

__all__ = ["CLIENT_STATS_EVENT", "ClientStatsReporter"]

CLIENT_STATS_EVENT = "samsara.client.stats"

_DELTA_KEYS = ("recorded", "delivered", "dropped_overflow", "rejected", "batches", "retries",
               "bytes_raw", "bytes_sent", "spooled", "restored", "dropped_spool")


class ClientStatsReporter:
    """Builds the periodic stats event from two successive stats snapshots."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.source_id = config.sourceId or f"samsara-mp:{socket.gethostname()}:{config.channel_name}"
        self._last: dict[str, Any] = {}

    def event(self, stats: dict[str, Any]) -> bytes:
        """The encoded stats event for this moment (deltas since the previous one)."""
        props: dict[str, Any] = {
            "eventName": CLIENT_STATS_EVENT,
            "sourceId": self.source_id,
            "timestamp": current_time_millis(),
            "channel": stats.get("channel"),
            "publisherPid": os.getpid(),
            "buffered": stats.get("buffered", 0),
            "bufferedBytes": stats.get("buffered_bytes", 0),
            "maxBufferSize": self.config.max_buffer_size,
            "publishInterval": self.config.publish_interval,
            "connectedClients": stats.get("connected_clients", 0),
            "spoolPending": stats.get("spool_pending", 0),
            "spoolBytes": stats.get("spool_bytes", 0),
        }
        for key in _DELTA_KEYS:
            now = int(stats.get(key, 0))
            props[_camel(key) + "Delta"] = now - int(self._last.get(key, 0))
        self._last = {k: stats.get(k, 0) for k in _DELTA_KEYS}
        return json.dumps(props, separators=(",", ":")).encode()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
