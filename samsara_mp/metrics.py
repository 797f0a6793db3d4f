"""Prometheus metrics of a channel, from its publisher's stats (the optional ``prometheus`` extra).

The publisher's counters become Prometheus metrics through a custom collector
of ``prometheus_client``, which writes the exposition format: served on
``/metrics`` by the publisher when ``metrics_port`` is set, and printed by
``samsara-mp status --format prometheus``. Every metric has a ``channel``
label, so one scrape of many channels (``status`` with no channel) keeps them
apart. Counters are the publisher's own, monotonic while it lives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["StatsCollector", "exposition", "registry_for", "serve"]

log = logging.getLogger("samsara_mp")

# (metric name without _total, stats key, help)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("samsara_mp_events_recorded", "recorded", "Events recorded by the channel's processes."),
    ("samsara_mp_events_delivered", "delivered", "Events the API accepted (2xx)."),
    ("samsara_mp_events_rejected", "rejected", "Events the API refused as invalid."),
    ("samsara_mp_events_filtered", "filtered", "Events before_send dropped (never recorded)."),
    ("samsara_mp_events_sampled_out", "sampled_out", "Events sampling left out (never recorded)."),
    ("samsara_mp_retries", "retries", "Failed POST attempts that were retried."),
    ("samsara_mp_events_spooled", "spooled", "Events moved to the spool on disk."),
    ("samsara_mp_events_restored", "restored", "Events read back from the spool on disk."),
    ("samsara_mp_loop_errors", "loop_errors", "Unexpected errors the publisher's threads survived."),
    ("samsara_mp_hook_errors", "hook_errors", "Exceptions raised by on_success/on_failure hooks."),
)
# (gauge name, stats key, help)
_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("samsara_mp_buffer_events", "buffered", "Events in the shared buffer."),
    ("samsara_mp_buffer_bytes", "buffered_bytes", "Encoded bytes in the shared buffer."),
    ("samsara_mp_spool_events", "spool_pending", "Events waiting in the spool on disk."),
    ("samsara_mp_spool_bytes", "spool_bytes", "Bytes of the spool on disk."),
    ("samsara_mp_loop_up", "loop_alive", "1 while the publish loop runs."),
    ("samsara_mp_oldest_buffered_age_seconds", "oldest_buffered_age_s",
     "How long the oldest buffered event has waited."),
)
# reason label -> stats key
_DROPS = (("overflow", "dropped_buffer"), ("staging", "dropped_staging"), ("spool", "dropped_spool"))


class StatsCollector:
    """Yields a channel's metrics from ``get_stats()``: a list of (channel, stats or None)."""

    def __init__(self, get_stats: Callable[[], Iterable[tuple[str, dict[str, Any] | None]]]) -> None:
        self.get_stats = get_stats
        # The highest value exported per counter series: a scrape never goes
        # backwards, even when the publisher moves an in-flight event from
        # dropped (overflow) to delivered after all.
        self._high: dict[tuple[str, ...], float] = {}

    def _counter_value(self, key: tuple[str, ...], value: object) -> float:
        number = float(value) if isinstance(value, (int, float)) else 0.0
        high = max(self._high.get(key, 0.0), number)
        self._high[key] = high
        return high

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        channels = list(self.get_stats())
        up = GaugeMetricFamily("samsara_mp_publisher_up", "1 when the channel's publisher answers.",
                               labels=["channel"])
        counters = {name: CounterMetricFamily(name, text, labels=["channel"]) for name, _, text in _COUNTERS}
        dropped = CounterMetricFamily("samsara_mp_events_dropped", "Events dropped, by reason.",
                                      labels=["channel", "reason"])
        requests = CounterMetricFamily("samsara_mp_requests", "POSTs answered, by HTTP status.",
                                       labels=["channel", "status"])
        gauges = {name: GaugeMetricFamily(name, text, labels=["channel"]) for name, _, text in _GAUGES}
        success = GaugeMetricFamily("samsara_mp_last_success_timestamp_seconds",
                                    "When the API last accepted a batch (Unix time).", labels=["channel"])
        for channel, stats in channels:
            up.add_metric([channel], 0.0 if stats is None else 1.0)
            if stats is None:
                continue
            for name, key, _ in _COUNTERS:
                counters[name].add_metric([channel], self._counter_value((name, channel), stats.get(key)))
            for reason, key in _DROPS:
                dropped.add_metric([channel, reason],
                                   self._counter_value(("dropped", channel, reason), stats.get(key)))
            for status, count in sorted((stats.get("statuses") or {}).items()):
                requests.add_metric([channel, str(status)],
                                    self._counter_value(("requests", channel, str(status)), count))
            for name, key, _ in _GAUGES:
                gauges[name].add_metric([channel], float(stats.get(key) or 0))
            last = stats.get("last_success_at")
            if isinstance(last, (int, float)):
                success.add_metric([channel], float(last))
        yield up
        yield from counters.values()
        yield from (dropped, requests, success)
        yield from gauges.values()


def registry_for(get_stats: Callable[[], Iterable[tuple[str, dict[str, Any] | None]]]) -> CollectorRegistry:
    """A registry holding only a :class:`StatsCollector` over ``get_stats``."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(get_stats))
    return registry


def exposition(channels: Iterable[tuple[str, dict[str, Any] | None]]) -> str:
    """The Prometheus text exposition of these channels' stats."""
    from prometheus_client import generate_latest

    fixed = list(channels)
    return generate_latest(registry_for(lambda: fixed)).decode()


def serve(host: str, port: int, get_stats: Callable[[], dict[str, Any]], channel: str) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; the server (``shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    started = start_http_server(port, addr=host, registry=registry_for(lambda: [(channel, get_stats())]))
    return started[0] if isinstance(started, tuple) else None
