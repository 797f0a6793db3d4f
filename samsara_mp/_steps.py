"""The optional steps between validating an event and staging it: ``disabled``, sampling by
``sourceId``, ``before_send``, and capture by ``testing.capture_events()``. With none of
them on, ``record_event`` skips this module (docs/design.md, "Staging and backpressure")."""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from . import process
from ._staging import Staging
from .config import Config
from .errors import InvalidEvent
from .event import EventEncoder

__all__ = ["Steps"]

log = logging.getLogger("samsara_mp")

# At most one log line per this many seconds about a raising before_send.
_HOOK_ERROR_LOG_INTERVAL = 10.0


class Steps:
    """What a configuration (or an active capture) does to an event before it is staged."""

    def __init__(self, config: Config, encoder: EventEncoder, staging: Staging) -> None:
        self.config = config
        self.encoder = encoder
        self.staging = staging
        rate = config.sample_rate
        # Keep a source when crc32(sourceId) falls below this (None: keep all).
        self.sample_below: int | None = None if rate >= 1.0 else int(rate * 2**32)
        self.before_send: Callable[[dict[str, Any]], Any] | None = config.before_send_hook
        self.reset()

    def reset(self) -> None:
        """Fresh counts (at construction, and in a forked child)."""
        self.disabled_events = 0  # validated and discarded: disabled=True
        self.before_send_errors = 0
        self.direct_filtered = self.direct_sampled_out = 0  # of publish_events' events
        self._errors_logged = 0
        self._next_error_log = 0.0

    def active(self) -> bool:
        """Whether any step is on (else record_event takes the plain path)."""
        return bool(self.before_send is not None or self.sample_below is not None
                    or self.config.disabled or process.capturing())

    def prepare(self, event: dict[str, Any], report: bool = True) -> bytes | None:
        """The event's bytes to stage, or None when it is not to be staged:
        discarded (``disabled``), sampled out, filtered by ``before_send``, or captured.

        ``report``: count what is left out in the channel's stats too (not for
        publish_events, whose events never pass through the publisher)."""
        encoder = self.encoder
        encoder.enrich(event)
        sinks = process.capture_sinks()
        if sinks:
            report = False  # capturing: nothing here reaches a publisher
        elif self.config.disabled:
            encoder.encode_enriched(event)  # validated all the same
            self.disabled_events += 1
            return None
        below = self.sample_below
        if below is not None and zlib.crc32(event["sourceId"].encode("utf-8", "surrogatepass")) >= below:
            self._left_out(0, 1, report)
            return None
        hook = self.before_send
        if hook is not None:
            try:
                result = hook(event)
            except Exception as exc:  # noqa: BLE001 - never send what the hook did not clear
                self._left_out(1, 0, report)
                self._failed(exc)
                return None
            if result is None:
                self._left_out(1, 0, report)
                return None
            if not isinstance(result, dict):
                if not isinstance(result, Mapping):
                    raise InvalidEvent(
                        "event", f"before_send returned {type(result).__name__}, not a dict or None"
                    )
                result = dict(result)
            encoder.enrich(result)  # what it returns is validated like any event
            event = result
        data = encoder.encode_enriched(event)
        if sinks:
            for sink in sinks:
                sink.append(json.loads(data))  # what the API would have received
            return None
        return data

    def _left_out(self, filtered: int, sampled_out: int, report: bool) -> None:
        if report:
            self.staging.note_left_out(filtered, sampled_out)
        else:
            self.direct_filtered += filtered
            self.direct_sampled_out += sampled_out

    def _failed(self, exc: Exception) -> None:
        self.before_send_errors += 1
        now = time.monotonic()
        if now < self._next_error_log:
            return
        self._next_error_log = now + _HOOK_ERROR_LOG_INTERVAL
        since = self.before_send_errors - self._errors_logged
        self._errors_logged = self.before_send_errors
        log.warning(
            "samsara_mp: before_send raised %s; the event was dropped (%d such errors since the "
            "last report, %d in all; reported at most every %.0fs)",
            type(exc).__name__, since, self.before_send_errors, _HOOK_ERROR_LOG_INTERVAL,
            exc_info=exc,
        )
