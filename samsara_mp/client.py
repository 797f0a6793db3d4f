"""The worker side: ``SamsaraClient``, and the process's shared client.

``record_event`` validates and encodes the event in the caller, appends the
bytes to this process's bounded staging (``staging.py``) and returns; the
shipper (``shipper.py``) pushes staged events to the channel's publisher in
batches. A client that may start a publisher launches one when it is made,
if none runs on its channel, without waiting for it and without starting a
thread; the shipper thread starts at the first staged event. Nothing here
waits on the publisher from ``record_event``, and every IPC wait is bounded
by ``ipc_timeout``.

Between validation and staging sit the optional steps a configuration (or an
active ``testing.capture_events()``) turns on: ``disabled``, sampling by
``sourceId``, ``before_send``, capture. With none of them on, ``record_event``
pays one attribute check for them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import process
from ._procfs import process_running
from .channel import Channel
from .config import ENV_PREFIX, Config, export_to_env
from .errors import ChannelError, InvalidEvent, PublishError
from .event import EventEncoder
from .ipc import IPCError
from .process import close_all, reset_after_fork, ship_all  # re-exported
from .shipper import Shipper
from .staging import Staging

__all__ = ["SamsaraClient", "get_client", "ship_all", "close_all", "reset_after_fork"]

log = logging.getLogger("samsara_mp")

_IPC_ERRORS = (IPCError, ChannelError, EOFError, OSError)
# At most one log line per this many seconds about a raising before_send.
_HOOK_ERROR_LOG_INTERVAL = 10.0


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
        self._encoder = EventEncoder(self.config.sourceId, self.config.max_event_bytes)
        self._ship_batch = self.config.ship_batch
        self._ship_delay_s = self.config.ship_delay_s
        self.closed = False
        self.discarded = 0  # staged events given up by close() (no publisher in time)
        self.pid = os.getpid()
        self._staging = Staging(self.config.staging_size, self.config.staging_bytes)
        self._shipper = Shipper(self.config, self.channel, self._staging)
        self._thread_started = False
        rate = self.config.sample_rate
        # Keep a source when crc32(sourceId) falls below this (None: keep all).
        self._sample_below: int | None = None if rate >= 1.0 else int(rate * 2**32)
        self._before_send: Callable[[dict[str, Any]], Any] | None = self.config.before_send_hook
        self.disabled_events = 0  # validated and discarded: disabled=True
        self.before_send_errors = 0
        self._errors_logged = 0
        self._next_error_log = 0.0
        self._special = False
        self.refresh_mode()
        process.register(self)
        if (self.config.start_publishing_thread and not process.owner_expected()
                and not self.config.disabled and not process.capturing()):
            self._launch_early()

    def refresh_mode(self) -> None:
        """Decide whether record_event takes the plain path or :meth:`_prepare`."""
        self._special = bool(
            self._before_send is not None or self._sample_below is not None
            or self.config.disabled or process.capturing()
        )

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
        self.disabled_events = self.before_send_errors = self._errors_logged = 0

    @property
    def threaded(self) -> bool:
        """True when a shipper thread ships (or will, at the first event); False when
        ``record_event`` ships inline."""
        return not self._shipper.inline

    # ---- hot path ----
    def record_event(self, **event: Any) -> None:
        """Validate, encode and stage one event; raise only ``InvalidEvent``."""
        if self._special:
            data = self._prepare(event)
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

    def _prepare(self, event: dict[str, Any], report: bool = True) -> bytes | None:
        """The event's bytes to stage, or None when it is not to be staged:
        discarded (``disabled``), sampled out, filtered by ``before_send``, or captured.

        ``report``: count what is left out in the channel's stats too (not for
        publish_events, whose events never pass through the publisher)."""
        encoder = self._encoder
        encoder.enrich(event)
        sinks = process.capture_sinks()
        if sinks:
            report = False  # capturing: nothing here reaches a publisher
        elif self.config.disabled:
            encoder.encode_enriched(event)  # validated all the same
            self.disabled_events += 1
            return None
        below = self._sample_below
        if below is not None and zlib.crc32(event["sourceId"].encode("utf-8", "surrogatepass")) >= below:
            self._staging.note_left_out(0, 1, report)
            return None
        hook = self._before_send
        if hook is not None:
            try:
                result = hook(event)
            except Exception as exc:  # noqa: BLE001 - never send what the hook did not clear
                self._staging.note_left_out(1, 0, report)
                self._before_send_failed(exc)
                return None
            if result is None:
                self._staging.note_left_out(1, 0, report)
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

    def _before_send_failed(self, exc: Exception) -> None:
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
                    data = self._prepare(dict(event), report=False)
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
        """Push every staged event to the publisher within ``timeout``; True when done.

        The one wait that may overrun ``timeout`` is for a publisher being
        started when none ran (up to 10 s)."""
        shipper = self._shipper
        deadline = time.monotonic() + (self.config.ipc_timeout_s if timeout is None else timeout)
        if shipper.reentered():
            return False  # a signal handler interrupted a push: the connection is mid-message
        try:
            while self._staging.has_work() or shipper.pending or shipper.awaiting:
                if time.monotonic() >= deadline:
                    return False
                if not shipper.ship_once(deadline=deadline):
                    wait = min(shipper.retry_wait(), deadline - time.monotonic())
                    if wait > 0:
                        time.sleep(wait)
                    shipper.next_connect = 0.0
            return True
        finally:
            if shipper.retired:
                shipper.close_connection(True, 0.0)  # used after close(): keep no connection

    def flush(self, timeout: float | None = None) -> bool:
        """Ship staged events and wait until the publisher has sent all it holds.

        True when everything buffered before the call has left the buffer
        (delivered, or counted as rejected or dropped) within ``timeout``
        (None: 30 s, as ``close(None)`` takes its default).
        """
        if timeout is None:
            timeout = 30.0
        if self.config.disabled or process.capturing():
            return self.ship(timeout)  # nothing of this mode reaches a publisher: never elect one
        deadline = time.monotonic() + timeout
        shipper = self._shipper
        if not self.ship(timeout):
            return False
        if deadline - time.monotonic() <= 0:
            return False
        done: bool | None = False
        peer: str | None = None
        covers = 0
        try:
            # On a connection of its own: the wait (a Retry-After may make it long)
            # must not hold the shipper's, or the thread, ship() and stats() would
            # wait behind it.
            done, peer, covers = shipper.wait_flushed(deadline)
            if done is None:
                # No publisher answered: the shipper's connection elects one, unless
                # one that holds events of this process went (they may be lost).
                with shipper.peers_lock:
                    lost = self._settle_flush(None, None, 0)
                if lost:
                    return self._lost(lost)
                left = deadline - time.monotonic()
                if left > 0:
                    covers = shipper.pushes_acked
                    done, peer = shipper.call("flush", left, timeout=left + self.config.ipc_timeout_s,
                                              elect=True, deadline=deadline, with_peer=True)
        except _IPC_ERRORS as exc:
            log.warning("samsara_mp: flush could not reach the publisher: %s", str(exc) or type(exc).__name__)
            done = False
        with shipper.peers_lock:
            lost = self._settle_flush(done, peer, covers)
            # Another that took events of it still runs: not answered for.
            unanswered = done and any(h.number <= covers for h in shipper.unflushed_peers.values())
        if lost:
            return self._lost(lost)
        return bool(done) and not unanswered

    def _settle_flush(self, done: bool | None, peer: str | None, covers: int) -> list[str]:
        """After a flush answered ``done`` by publisher ``peer`` (its instance id) for
        the pushes numbered up to ``covers``: forget the publishers it answers for,
        and those that have ended; return those that ended without draining
        (killed: what they held is lost), each as "pid N".

        A flush is done only when the publisher that answers is the one that took
        this process's pushes since the last done flush. One that ended cleanly
        (it delivered, spooled or counted all it held) leaves a mark in the
        channel's directory, so a restart or an idle exit raises no alarm.
        Called holding ``peers_lock``."""
        peers = self._shipper.unflushed_peers
        lost = []
        for instance, holder in list(peers.items()):
            if done and instance == peer:
                if holder.number > covers:
                    continue  # pushed while it waited: the next flush's to answer for
            elif self.channel.ended_cleanly(instance):
                pass
            elif holder.process is None:
                pass  # the system names no process (another pid namespace): cannot tell
            elif process_running(*holder.process):
                continue
            else:
                lost.append(f"pid {holder.process[0]}")
            if peers.get(instance) == holder:  # not replaced by a newer push meanwhile
                del peers[instance]
        return lost

    def _lost(self, which: list[str]) -> bool:
        # Said once (this flush is not done): the next answers for what follows.
        log.warning("samsara_mp: the publisher (%s) that took events of this flush ended "
                    "without draining; they may be lost", ", ".join(sorted(which)))
        return False

    def stats(self) -> dict[str, Any]:
        """This process's counters, and the channel's from its publisher when reachable."""
        shipper = self._shipper
        timeout = self.config.ipc_timeout_s
        end = time.monotonic() + timeout
        if shipper.reentered():
            # A signal handler interrupted this thread mid-push: the connection
            # and the counts are mid-change; only this process's view is given.
            result = self._stats(0.0, held=False, ask=False)
            result["error"] = "stats() from a signal handler that interrupted a push: local counts only"
            return result
        # Holding the connection's lock, no push of this process can land between
        # the local counts and the publisher's: none is counted twice or not at all.
        # A thread stuck in a push past this bound (close() shuts its connection
        # down) leaves the snapshot to go on without it; the push it has in
        # flight is settled below by the publisher's answer.
        held = shipper.enter(timeout)
        try:
            if held and shipper.awaiting:
                # Read an inline push's answer first, so the snapshot does not hold it
                # as unreported while the publisher counts it (an older publisher
                # sends no client_last_push to settle it).
                shipper.read_answer(max(end - time.monotonic(), 0.001))
            return self._stats(max(end - time.monotonic(), 0.001), held)
        finally:
            if held:
                shipper.lock.release()

    def _stats(self, timeout: float, held: bool, ask: bool = True) -> dict[str, Any]:
        staging = self._staging
        shipper = self._shipper
        with staging.lock:
            push = shipper.pending
            local: dict[str, Any] = {
                "recorded": staging.recorded,
                "staged": len(staging) + (len(push.payloads) if push else 0),
                "staged_bytes": staging.nbytes,
                "dropped_staging": staging.dropped,
                "discarded": self.discarded,
                "unreported_recorded": staging.unreported_recorded + (push.recorded if push else 0),
                "unreported_dropped": staging.unreported_dropped + (push.dropped if push else 0),
                # Never staged, so not in recorded: see README, "Filtering, sampling and tests".
                "filtered": staging.filtered,
                "sampled_out": staging.sampled_out,
                "before_send_errors": self.before_send_errors,
                "disabled": self.disabled_events,
                "unreported_filtered": staging.unreported_filtered + (push.filtered if push else 0),
                "unreported_sampled_out": staging.unreported_sampled_out + (push.sampled_out if push else 0),
                "threaded": self.threaded,
                "shipper_alive": self._shipper.thread is not None and self._shipper.thread.is_alive(),
                "shipper_errors": shipper.thread_errors,
                "pid": os.getpid(),
                "channel": self.channel.name,
            }
        result: dict[str, Any] = {"local": local, "channel": None}
        if not ask:
            return result
        if self.config.disabled or process.capturing():
            result["error"] = "disabled" if self.config.disabled else "capturing"
            return result
        answer: Any = None
        try:
            answer = shipper.call("stats", shipper.client_id, timeout=timeout, held=held)
            chan = dict(answer)
        except (TypeError, ValueError):
            result["error"] = f"the publisher answered stats with a {type(answer).__name__}, not counters"
            return result
        except _IPC_ERRORS as exc:
            cause = self.channel.last_failure()
            result["error"] = str(exc) + (f" (the last publisher logged: {cause})" if cause else "")
            return result
        taken = chan.pop("client_last_push", None)  # absent from an older publisher
        if push is not None and taken is not None and push.seq <= taken:
            # The push in flight at the snapshot has reached the publisher (its
            # answer was lost, or is being read): its counts are in the channel's.
            local["staged"] -= len(push.payloads)
            local["unreported_recorded"] -= push.recorded
            local["unreported_dropped"] -= push.dropped
            local["unreported_filtered"] -= push.filtered
            local["unreported_sampled_out"] -= push.sampled_out
        # Events staged here are recorded but not yet known to the publisher.
        chan["recorded"] += local["unreported_recorded"]
        chan["dropped_overflow"] += local["unreported_dropped"]
        chan["dropped_staging"] += local["unreported_dropped"]
        chan["filtered"] = chan.get("filtered", 0) + local["unreported_filtered"]
        chan["sampled_out"] = chan.get("sampled_out", 0) + local["unreported_sampled_out"]
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
        if self._shipper.reentered():
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
        self._shipper.close_connection(ended, max(deadline - time.monotonic(), 0.05))
        process.unregister(self)
        return shipped

    def _discard_staged(self) -> int:
        """Give up what is staged at a close() that could not ship it, and the push
        taken for the publisher if it never left. A push already written stays
        pending: the publisher may hold it (``stats()`` asks whether it does)."""
        shipper = self._shipper
        if not shipper.enter(0.0):  # a push is being written: it is sent
            return self._staging.discard()
        try:
            push = shipper.pending
            if push is None or push.sent:
                return self._staging.discard()
            shipper.pending = None
            return self._staging.discard(push)
        finally:
            shipper.lock.release()

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
