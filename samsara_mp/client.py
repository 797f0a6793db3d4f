"""The worker side: ``SamsaraClient``, and the process's shared client.

``record_event`` validates and encodes the event in the caller, appends the
bytes to this process's bounded staging (``staging.py``) and returns; the
shipper (``shipper.py``) pushes staged events to the channel's publisher in
batches. A client that may start a publisher launches one when it is made,
if none runs on its channel, without waiting for it and without starting a
thread; the shipper thread starts at the first staged event. Nothing here
waits on the publisher from ``record_event``, and every IPC wait is bounded
by ``ipc_timeout``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import process
from .channel import Channel
from .config import Config, export_to_env
from .errors import ChannelError, PublishError
from .event import EventEncoder
from .ipc import IPCError
from .process import close_all, reset_after_fork, ship_all  # re-exported
from .shipper import Shipper
from .staging import Staging

__all__ = ["SamsaraClient", "get_client", "ship_all", "close_all", "reset_after_fork"]

log = logging.getLogger("samsara_mp")

_IPC_ERRORS = (IPCError, ChannelError, EOFError, OSError)


class SamsaraClient:
    """Records events into the channel's shared buffer; compatible with ``samsara_sdk``.

    ``SamsaraClient(url=..., sourceId=..., **config)``. The client always
    ships its events in the background. With ``start_publishing_thread=True``
    (the default), when no publisher runs on its channel, it launches one as
    it is made; with ``False`` it only connects to a publisher someone else
    owns (a gunicorn master, a Celery main process, ``samsara-mp publisher``).
    """

    def __init__(self, url: str | None = None, sourceId: str | None = None, **config: Any) -> None:
        if url is not None:
            config["url"] = url
        if sourceId is not None:
            config["sourceId"] = sourceId
        self.config = Config.build(**config)
        self.channel = Channel(self.config)
        self.exit_timeout_s = self.config.exit_timeout_s
        self._encoder = EventEncoder(self.config.sourceId, self.config.max_event_bytes)
        self._ship_batch = self.config.ship_batch
        self._ship_delay_s = self.config.ship_delay_s
        self.closed = False
        self.discarded = 0  # staged events given up by close() (no publisher in time)
        self.pid = os.getpid()
        self._staging = Staging(self.config.staging_size, self.config.staging_bytes)
        self._shipper = Shipper(self.config, self.channel, self._staging)
        self._thread_started = False
        process.register(self)
        if self.config.start_publishing_thread and not process.owner_expected():
            self._launch_early()

    def _launch_early(self) -> None:
        """Start the election now, so a cold channel's publisher is up by the first push."""
        try:
            self.channel.launch_publisher()
        except (ChannelError, OSError) as exc:
            log.warning("samsara_mp: cannot start a publisher on channel %s: %s", self.channel.name, exc)

    def after_fork_in_child(self) -> None:
        """Fresh per-process state in a forked child; the parent ships what it had staged."""
        if self.closed or self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self._staging = Staging(self.config.staging_size, self.config.staging_bytes)
        self._shipper.staging = self._staging
        self._shipper.after_fork()
        self._thread_started = False

    @property
    def threaded(self) -> bool:
        """True when a shipper thread ships (or will, at the first event); False when
        ``record_event`` ships inline."""
        return not self._shipper.inline

    # ---- hot path ----
    def record_event(self, **event: Any) -> None:
        """Validate, encode and stage one event; raise only ``InvalidEvent``."""
        n = self._staging.add(self._encoder.encode_owned(event))
        shipper = self._shipper
        if n == 1 or n == self._ship_batch:
            if self._thread_started or self._start_thread():
                shipper.wake.set()
        if shipper.inline and (
            n >= self._ship_batch or time.monotonic() - self._staging.since >= self._ship_delay_s
        ):
            shipper.ship_inline()

    def _start_thread(self) -> bool:
        self._thread_started = self._shipper.start_thread()
        return self._thread_started

    # ---- public API ----
    def publish_events(self, events: Iterable[Mapping[str, Any]]) -> bool:
        """Send these events now, synchronously, from this process.

        Returns True when the API accepted them all; raises ``InvalidEvent``
        before sending anything if one is invalid, and ``PublishError`` when
        the API refused any or could not be reached.
        """
        # Imported here: a worker that only records never loads requests.
        from .delivery import settle
        from .transport import Transport

        payloads = self._encoder.encode_many(events)
        if not payloads:
            return True
        transport = Transport.from_config(self.config)
        try:
            outcome = settle(transport, payloads)
        finally:
            transport.close()
        if len(outcome.delivered) == len(payloads):
            return True
        raise PublishError(
            f"{len(payloads) - len(outcome.delivered)} of {len(payloads)} events not accepted: "
            f"{outcome.error}",
            status=outcome.status,
            body="; ".join(outcome.reject_reasons[:5]) or None,
        )

    def ship(self, timeout: float | None = None) -> bool:
        """Push every staged event to the publisher within ``timeout``; True when done.

        The one wait that may overrun ``timeout`` is for a publisher being
        started when none ran (up to 10 s)."""
        shipper = self._shipper
        deadline = time.monotonic() + (self.config.ipc_timeout_s if timeout is None else timeout)
        while self._staging.has_work() or shipper.pending or shipper.awaiting:
            if time.monotonic() >= deadline:
                return False
            if not shipper.ship_once(deadline=deadline):
                wait = min(shipper.retry_wait(), deadline - time.monotonic())
                if wait > 0:
                    time.sleep(wait)
                shipper.next_connect = 0.0
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Ship staged events and wait until the publisher has sent all it holds.

        True when everything buffered before the call has left the buffer
        (delivered, or counted as rejected or dropped) within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        if not self.ship(timeout):
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            return bool(self._shipper.call("flush", left, timeout=left + self.config.ipc_timeout_s,
                                           elect=True, deadline=deadline))
        except _IPC_ERRORS as exc:
            log.warning("samsara_mp: flush could not reach the publisher: %s", exc)
            return False

    def stats(self) -> dict[str, Any]:
        """This process's counters, and the channel's from its publisher when reachable."""
        staging = self._staging
        shipper = self._shipper
        with staging.lock:
            push = shipper.pending
            local = {
                "recorded": staging.recorded,
                "staged": len(staging) + (len(push.payloads) if push else 0),
                "staged_bytes": staging.nbytes,
                "dropped_staging": staging.dropped,
                "discarded": self.discarded,
                "unreported_recorded": staging.unreported_recorded + (push.recorded if push else 0),
                "unreported_dropped": staging.unreported_dropped + (push.dropped if push else 0),
                "threaded": self.threaded,
                "shipper_alive": self._shipper.thread is not None and self._shipper.thread.is_alive(),
                "shipper_errors": shipper.thread_errors,
                "pid": os.getpid(),
                "channel": self.channel.name,
            }
        result: dict[str, Any] = {"local": local, "channel": None}
        try:
            chan = dict(shipper.call("stats", timeout=self.config.ipc_timeout_s))
        except _IPC_ERRORS as exc:
            cause = self.channel.last_failure()
            result["error"] = str(exc) + (f" (the last publisher logged: {cause})" if cause else "")
            return result
        # Events staged here are recorded but not yet known to the publisher.
        chan["recorded"] += local["unreported_recorded"]
        chan["dropped_overflow"] += local["unreported_dropped"]
        chan["dropped_staging"] += local["unreported_dropped"]
        chan["staged"] = local["staged"]
        result["channel"] = chan
        return result

    def close(self, timeout: float | None = None) -> bool:
        """Ship what is staged, stop the shipper, disconnect; True when nothing was left.

        Events that could not be shipped within ``timeout`` are given up,
        logged at WARNING with their number, and counted as ``discarded``.
        """
        if self.closed:
            return True
        if timeout is None:
            timeout = self.config.ipc_timeout_s * 2
        shipped = self.ship(timeout)
        self.closed = True
        self._shipper.stop_thread(max(self.config.ipc_timeout_s, 1.0))
        if not shipped:
            push = self._shipper.pending
            left = self._staging.discard() + (len(push.payloads) if push and not push.sent else 0)
            self.discarded += left
            if left:
                log.warning(
                    "samsara_mp: %d staged events discarded: no publisher of channel %s took them "
                    "within %.1fs", left, self.channel.name, timeout,
                )
        self._shipper.drop_connection()
        process.unregister(self)
        return shipped

    async def aflush(self, timeout: float = 30.0) -> bool:
        """:meth:`flush` for async code: the wait runs in a worker thread, off the event loop."""
        import asyncio  # here: a worker that never awaits does not import asyncio

        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> bool:
        """:meth:`close` for async code (an ASGI lifespan's shutdown), run off the event loop."""
        import asyncio

        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> SamsaraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default_client: SamsaraClient | None = None
_default_lock = threading.Lock()


def get_client(**config: Any) -> SamsaraClient:
    """This process's shared client, created on first use from ``config`` and the environment.

    Integrations and application code call it alike, so one process has one
    staging area and one shipper however many modules record events. The keys
    given here are exported as ``SAMSARA_MP_*`` variables of this process, so
    that a child started by any method (fork, spawn, forkserver, a subprocess)
    gets the same configuration from its own ``get_client()``.
    """
    global _default_client
    with _default_lock:
        client = _default_client
        if client is None or client.closed:
            client = _default_client = SamsaraClient(**config)
            export_to_env({k: v for k, v in config.items() if v is not None})
        return client
