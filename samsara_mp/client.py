"""The worker side's facade: ``SamsaraClient``, and the process's shared client.

``record_event`` validates and encodes the event in the caller and appends
the bytes to this process's staging (``_staging.py``); the shipper
(``_shipper.py``) moves them into the publisher's ring as fast as it has room,
over the process's link (``_link.py``); ``flush`` is ``_flush.py``. Nothing
here waits on the publisher from ``record_event``, and every wait on it is
bounded (docs/design.md, "Workers").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import process
from ._client_stats import client_stats
from ._env import ENV_PREFIX, export_to_env
from ._flush import Flush
from ._link import Link
from ._shipper import Shipper
from ._staging import Staging
from ._steps import Steps
from .channel import Channel
from .config import Config
from .errors import ChannelError, InvalidEvent, PublishError
from .event import EventEncoder
from .process import close_all, reset_after_fork, ship_all  # re-exported

__all__ = ["SamsaraClient", "get_client", "ship_all", "close_all", "reset_after_fork"]

log = logging.getLogger("samsara_mp")



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
        if (process.capturing() and config.get("url") is None and ENV_PREFIX + "URL" not in os.environ
                and config.get("disabled") is None):
            # Made inside capture_events() with no url anywhere: a client that
            # never sends (it captures while the block is active, then discards).
            config["disabled"] = True
        self.config = Config.build(**config)
        self.channel = Channel(self.config)
        self.exit_timeout_s = self.config.exit_timeout_s
        self._encoder = EventEncoder(self.config.sourceId, self.config.max_event_bytes,
                                     warn_small_timestamps=self.config.warn_small_timestamps)
        self._ship_batch = self.config.ship_batch
        self._ship_delay_s = self.config.ship_delay_s
        self.closed = False
        self.discarded = 0  # staged events given up by close() (no publisher in time)
        self.pid = os.getpid()
        self._staging = Staging(self.config.staging_size, self.config.staging_bytes)
        self._link = Link(self.config, self.channel)
        self._shipper = Shipper(self.config, self._link, self._staging)
        self._flush = Flush(self._link, self._shipper)
        self._thread_started = False
        self._steps = Steps(self.config, self._encoder, self._staging)
        self._special = False
        self.refresh_mode()
        process.register(self)
        if (self.config.start_publishing_thread and not process.owner_expected()
                and not self.config.disabled and not process.capturing()):
            self._launch_early()

    def refresh_mode(self) -> None:
        """Decide whether record_event takes the plain path or the optional steps."""
        self._special = self._steps.active()

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
        self._shipper.staging = self._steps.staging = self._staging
        self._shipper.after_fork()
        self._flush.reset()
        self._steps.reset()
        self._thread_started = False

    @property
    def threaded(self) -> bool:
        """True when a shipper thread ships (or will, at the first event); False when
        ``record_event`` ships inline."""
        return not self._shipper.inline

    # ---- hot path ----
    def record_event(self, **event: Any) -> None:
        """Validate, encode and stage one event; raise only ``InvalidEvent``."""
        if self._special:
            data = self._steps.prepare(event)
            if data is None:
                return
        else:
            data = self._encoder.encode_owned(event)
        n = self._staging.add(data)
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
        if self._thread_started:
            process.guard_pool_worker(self.exit_timeout_s)
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

        if self._special:
            payloads = []
            for index, event in enumerate(events):
                try:
                    if not isinstance(event, Mapping):
                        raise InvalidEvent("event", f"must be a mapping, not {type(event).__name__}")
                    data = self._steps.prepare(dict(event), report=False)
                except InvalidEvent as exc:
                    raise InvalidEvent(f"events[{index}].{exc.field}", exc.reason) from None
                if data is not None:
                    payloads.append(data)
        else:
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
        """Push every staged event into the ring within ``timeout``; True when done.

        Waits while the ring has no room for them. The one wait that may
        overrun ``timeout`` is for a publisher being started when none ran."""
        return self._ship(timeout, urge=False)

    def _ship(self, timeout: float | None, urge: bool) -> bool:
        """``urge``: when the ring has no room, ask the publisher once to send now
        (a flush's: the publisher may be waiting out a backoff)."""
        shipper = self._shipper
        deadline = time.monotonic() + (self.config.ipc_timeout_s if timeout is None else timeout)
        if self._link.reentered():
            return False  # a signal handler interrupted a push: the connection is mid-message
        try:
            while shipper.has_work():
                if time.monotonic() >= deadline:
                    return False
                if not shipper.ship_once(deadline=deadline):
                    if urge and shipper.no_room:
                        urge = False
                        self._flush.urge(deadline)
                    wait = min(shipper.retry_wait(), deadline - time.monotonic())
                    if wait > 0:
                        time.sleep(wait)
                    self._link.next_connect = 0.0
            return True
        finally:
            if self._link.retired:
                self._link.close(True, 0.0)  # used after close(): keep no connection

    def flush(self, timeout: float | None = None) -> bool:
        """Ship staged events and wait until the publisher has delivered them.

        True only when nothing this process recorded since the previous flush was
        lost: every such event was delivered, or deliberately left out (filtered,
        sampled out, refused by the API as invalid), within ``timeout`` (None: 30 s).
        """
        if timeout is None:
            timeout = 30.0
        if self.config.disabled or process.capturing():
            return self.ship(timeout)  # nothing of this mode reaches a publisher: never elect one
        deadline = time.monotonic() + timeout
        shipped = self._ship(timeout, urge=True)
        return self._flush.wait(deadline, shipped)

    def stats(self) -> dict[str, Any]:
        """This process's counters, and the channel's from its publisher when reachable."""
        link = self._link
        timeout = self.config.ipc_timeout_s
        end = time.monotonic() + timeout
        if link.reentered():
            # A signal handler interrupted this thread mid-push: only this process's view.
            result = client_stats(self, 0.0, held=False, ask=False)
            result["error"] = "stats() from a signal handler that interrupted a push: local counts only"
            return result
        # Holding the link, no push of this process lands between the local counts and
        # the publisher's. A thread stuck in a push past this bound leaves the snapshot
        # to go on without the lock; the publisher's record of this client settles it.
        held = link.enter(timeout)
        try:
            if held and self._shipper.awaiting:
                self._shipper.read_answer(max(end - time.monotonic(), 0.001))
            return client_stats(self, max(end - time.monotonic(), 0.001), held)
        finally:
            if held:
                link.leave()

    def close(self, timeout: float | None = None, *, send_now: bool = False) -> bool:
        """Ship what is staged, stop the shipper, disconnect; True when nothing was left.

        Events that could not be shipped within ``timeout`` are given up,
        logged at WARNING with their number, and counted as ``discarded``.
        ``send_now`` (the exit hook's): when this process pushed events that no
        flush has answered for, also ask the publisher to send them now rather
        than at its next ``publish_interval`` tick, not waiting for the delivery,
        within the same ``timeout``.
        """
        if self.closed:
            return True
        if self._link.reentered():
            # A signal handler interrupted this thread mid-push: the connection is
            # mid-message. Nothing is given up: the client stays open, and ships
            # what it holds at exit (a handler that exits next) or at a later close().
            log.warning(
                "samsara_mp: close() of channel %s from a signal handler that interrupted a push: "
                "deferred to the exit hook or a later close()", self.channel.name,
            )
            return False
        if timeout is None:
            timeout = self.config.ipc_timeout_s * 2
        deadline = time.monotonic() + timeout
        shipped = self.ship(timeout)
        if send_now:
            self._flush.send_now(deadline)
        self.closed = True
        # Within the same bound: a thread stuck in a push to a stuck publisher
        # is a daemon, and is not waited for past it.
        ended = self._shipper.stop_thread(max(deadline - time.monotonic(), 0.05))
        if not shipped:
            left = self._discard_staged()
            self.discarded += left
            if left:
                log.warning(
                    "samsara_mp: %d staged events discarded: no publisher of channel %s took them "
                    "within %.1fs", left, self.channel.name, timeout,
                )
            if ended:
                self._report_discarded(deadline)
        self._link.close(ended, max(deadline - time.monotonic(), 0.05))
        process.unregister(self)
        return shipped

    def _report_discarded(self, deadline: float) -> None:
        """Tell a reachable publisher what close() gave up (counted as dropped_staging), so
        the channel's accounting still adds up; a short try, never a wait for room."""
        shipper = self._shipper
        if self._link.conn is not None and shipper.pending is None and shipper.totals() != shipper.reported:
            shipper.ship_once(deadline=min(deadline, time.monotonic() + 0.2))

    def _discard_staged(self) -> int:
        """Give up what is staged at a close() that could not ship it, and the push
        taken for the publisher if it never left. A push already written stays
        pending: the publisher may hold it (``stats()`` asks whether it does)."""
        shipper = self._shipper
        if not self._link.enter(0.0):  # a push is being written: it is sent
            return self._staging.discard()
        try:
            push = shipper.pending
            if push is None or push.sent:
                return self._staging.discard()
            shipper.pending = None
            return self._staging.discard(push)
        finally:
            self._link.leave()

    async def aflush(self, timeout: float | None = None) -> bool:
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
