"""The worker side: ``SamsaraClient``.

``record_event`` validates and encodes the event in the caller, appends the
bytes to a small bounded per-process staging deque, and returns. A shipper
thread pushes staged events to the channel's publisher in batches (when a
batch fills or within ``ship_delay`` ms), so the IPC is paid per batch.
Where no thread can run (uWSGI without ``enable-threads``), ``record_event``
ships inline when a batch fills or the oldest staged event is old enough.
Nothing here waits on the publisher from ``record_event`` in threaded mode,
and every IPC wait is bounded by ``ipc_timeout``.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from . import process
from .channel import Channel
from .config import Config
from .delivery import settle
from .errors import ChannelError, PublishError
from .event import EventEncoder
from .ipc import IPCError, TimedConnection
from .process import close_all, get_client, reset_after_fork, ship_all  # re-exported
from .publisher import EXIT_LOST_ELECTION
from .transport import Transport

__all__ = ["SamsaraClient", "get_client", "ship_all", "close_all", "reset_after_fork"]

log = logging.getLogger("samsara_mp")

_CONNECT_BACKOFF_MAX = 2.0


class SamsaraClient:
    """Records events into the channel's shared buffer; compatible with ``samsara_sdk``.

    ``SamsaraClient(url=..., sourceId=..., **config)``. The client always
    ships its events in the background. With ``start_publishing_thread=True``
    (the default), when no publisher is reachable on its channel, it elects and
    starts one; with ``False`` it only connects to a publisher someone else
    owns (a gunicorn master, a Celery main process, ``samsara-mp publisher``).
    """

    def __init__(self, url: str | None = None, sourceId: str | None = None, **config: Any) -> None:
        if url is not None:
            config["url"] = url
        if sourceId is not None:
            config["sourceId"] = sourceId
        self.config = Config.build(**config)
        self.channel = Channel(self.config)
        self._encoder = EventEncoder(self.config.sourceId, self.config.max_event_bytes)
        self._bound = self.config.staging_size
        self._ship_batch = self.config.ship_batch
        self._closed = False
        self._init_process_state()
        process.register(self)
        self._start_shipper()

    # ---- per-process state (re-created after fork) ----
    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._client_id = f"{self._pid}-{secrets.token_hex(6)}"
        # Re-entrant: a signal handler that flushes may interrupt record_event.
        self._lock = threading.RLock()
        self._ship_lock = threading.RLock()
        self._wake = threading.Event()
        self._staged: deque[bytes] = deque()
        self._staged_since = 0.0
        self._recorded = 0  # in this process, ever
        self._unreported_recorded = 0
        self._unreported_dropped = 0
        self._staging_dropped = 0  # in this process, ever
        self._pending: tuple[int, list[bytes], int, int] | None = None
        self._pending_sent = False  # sent at least once: the publisher may hold it
        self._push_seq = 0
        self._push_limit = self._ship_batch * 4  # until the socket's size is known
        self._conn: TimedConnection | None = None
        self._next_connect = 0.0
        self._connect_failures = 0
        self._shipper: threading.Thread | None = None
        self._stopping = threading.Event()
        self._threaded = False

    def _after_fork_in_child(self) -> None:
        # The child must not ship the parent's staged events (the parent will),
        # nor use its connection, locks or thread.
        if self._closed or self._pid == os.getpid():
            return
        had_shipper = self._shipper is not None
        conn = self._conn
        self._init_process_state()
        if conn is not None:
            try:
                os.close(conn.fileno())
            except OSError:
                pass
            conn._handle = None  # type: ignore[attr-defined]
        if had_shipper:
            self._start_shipper()

    def _start_shipper(self) -> None:
        mode = self.config.shipper
        if mode == "inline" or (mode == "auto" and _uwsgi_without_threads()):
            log.info("samsara_mp: shipping from record_event (shipper=%s)", mode)
            self._threaded = False
            return
        try:
            thread = threading.Thread(target=self._ship_loop, name="samsara-mp-shipper", daemon=True)
            thread.start()
        except RuntimeError:
            log.info("samsara_mp: no thread can start here; shipping from record_event")
            self._threaded = False
            return
        self._shipper = thread
        self._threaded = True

    @property
    def threaded(self) -> bool:
        """True when a shipper thread ships; False when ``record_event`` ships inline."""
        return self._threaded

    # ---- hot path ----
    def record_event(self, **event: Any) -> None:
        """Validate, encode and stage one event; raise only ``InvalidEvent``."""
        data = self._encoder.encode_owned(event)
        with self._lock:
            staged = self._staged
            if len(staged) >= self._bound:
                staged.popleft()
                self._staging_dropped += 1
                self._unreported_dropped += 1
            elif not staged:
                self._staged_since = time.monotonic()
            staged.append(data)
            self._recorded += 1
            self._unreported_recorded += 1
            n = len(staged)
        if n == 1 or n == self._ship_batch:
            if self._threaded:
                self._wake.set()
        if not self._threaded and (
            n >= self._ship_batch or time.monotonic() - self._staged_since >= self.config.ship_delay_s
        ):
            self._ship_inline()

    # ---- shipping ----
    def _ship_loop(self) -> None:
        delay = self.config.ship_delay_s
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                break
            # Wait for a full batch, but no longer than ship_delay after the first event.
            deadline = self._staged_since + delay
            while len(self._staged) < self._ship_batch and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
                self._wake.clear()
            while (self._staged or self._pending) and not self._stopping.is_set():
                if not self._ship_once():
                    self._stopping.wait(self._retry_wait())
                    break
            if self._staged and not self._stopping.is_set():
                self._wake.set()

    def _retry_wait(self) -> float:
        return max(self._next_connect - time.monotonic(), self.config.ship_delay_s, 0.01)

    def _ship_inline(self) -> None:
        if time.monotonic() < self._next_connect:
            return
        self._ship_once(wait=False)

    def _ship_once(self, wait: bool = True, deadline: float | None = None) -> bool:
        """Push one batch to the publisher; False when it could not be reached
        (or, with a ``deadline``, not within it)."""
        if deadline is None:
            self._ship_lock.acquire()
        elif not self._ship_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            return False  # the shipper thread is mid-push: it bounds that push itself
        try:
            return self._ship_locked(wait, deadline)
        finally:
            self._ship_lock.release()

    def _ship_locked(self, wait: bool, deadline: float | None) -> bool:
        if self._pending is None:
            with self._lock:
                if not self._staged and not self._unreported_dropped:
                    return True
                staged = self._staged
                if len(staged) <= self._push_limit:
                    batch = list(staged)
                    self._staged = deque()
                else:
                    batch = [staged.popleft() for _ in range(self._push_limit)]
                # Every event still staged is recorded but not yet reported.
                recorded = self._unreported_recorded - len(self._staged)
                dropped = self._unreported_dropped
                self._unreported_recorded = len(self._staged)
                self._unreported_dropped = 0
                self._push_seq += 1
                self._pending = (self._push_seq, batch, recorded, dropped)
                self._pending_sent = False
        seq, batch, recorded, dropped = self._pending
        try:
            conn = self._connection(wait, deadline=deadline)
        except (IPCError, ChannelError, OSError) as exc:
            if not self._pending_sent:
                # It never left: back into staging, in order, within the bound.
                self._unship(batch, recorded, dropped)
            self._note_unreachable(exc)
            return False
        self._pending_sent = True
        try:
            conn.call("push", batch, self._client_id, seq, recorded, dropped,
                      timeout=self._bounded(self.config.ipc_timeout_s, deadline))
        except (IPCError, EOFError, OSError) as exc:
            # The publisher may or may not have taken it: keep the push as it
            # is, and resend it with the same seq, which the buffer ignores if
            # it already has it.
            self._drop_connection()
            self._note_unreachable(exc)
            return False
        self._pending = None
        self._connect_failures = 0
        self._size_push(conn, batch)
        return True

    def _size_push(self, conn: TimedConnection, batch: list[bytes]) -> None:
        """Cap pushes to what the socket takes in one write(): a push that needs
        several waits for the GIL between writes, up to a switch interval each,
        while a busy recording thread keeps filling staging."""
        if batch:
            avg = max(sum(map(len, batch)) // len(batch), 1) + 8  # pickle framing per item
            self._push_limit = max(self._ship_batch, (conn.sndbuf // 2) // avg)

    def _unship(self, batch: list[bytes], recorded: int, dropped: int) -> None:
        """Put a push that never left back at the front of staging, keeping the bound."""
        with self._lock:
            staged = self._staged
            staged.extendleft(reversed(batch))
            self._unreported_recorded += recorded
            self._unreported_dropped += dropped
            over = len(staged) - self._bound
            for _ in range(max(over, 0)):
                staged.popleft()
            if over > 0:
                self._staging_dropped += over
                self._unreported_dropped += over
            self._pending = None
            self._push_seq -= 1

    def _note_unreachable(self, exc: BaseException) -> None:
        self._connect_failures += 1
        backoff = min(0.05 * (2 ** min(self._connect_failures - 1, 8)), _CONNECT_BACKOFF_MAX)
        self._next_connect = time.monotonic() + backoff
        if self._connect_failures in (1, 10) or self._connect_failures % 100 == 0:
            log.warning(
                "samsara_mp: publisher of channel %s unreachable (%s); %d events staged",
                self.channel.name, exc, len(self._staged),
            )

    @staticmethod
    def _bounded(timeout: float, deadline: float | None) -> float:
        """``timeout``, cut to what is left before ``deadline`` (at least 10 ms)."""
        if deadline is None:
            return timeout
        return max(min(timeout, deadline - time.monotonic()), 0.01)

    def _connection(
        self, wait: bool = True, elect: bool = True, deadline: float | None = None
    ) -> TimedConnection:
        if self._conn is not None:
            return self._conn
        timeout = self.config.ipc_timeout_s
        try:
            self._conn = self.channel.connect(self._bounded(timeout, deadline))
        except IPCError:
            if not (elect and self.config.start_publishing_thread):
                raise
            if not self._elect(timeout, wait, deadline):
                raise
            self._conn = self.channel.connect(self._bounded(timeout, deadline))
        self._conn.timeout = timeout  # later calls get the full bound, not what the deadline left
        return self._conn

    def _elect(self, timeout: float, wait: bool = True, deadline: float | None = None) -> bool:
        """No publisher answers: start one if the lock is free, then wait for it."""
        self.channel.ensure_dir()
        if not self.channel.lock_is_free():
            # A publisher holds the lock: it is starting, or hung; wait a little.
            return self.channel.wait_connectable(self._bounded(timeout, deadline))
        proc = self.channel.spawn_publisher()
        if not wait:
            return False  # record_event ships inline: never wait for a start there
        # Not cut by the deadline: a publisher this call started is let come up
        # (the one wait ship(timeout) may overrun); otherwise a short ship, as
        # uWSGI's after-request hook does, could never elect one.
        ok = self.channel.wait_connectable(max(timeout, 10.0), proc)
        if not ok and proc.poll() == EXIT_LOST_ELECTION:
            ok = self.channel.wait_connectable(self._bounded(timeout, deadline))
        return ok

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    # ---- public API ----
    def publish_events(self, events: Iterable[Mapping[str, Any]]) -> bool:
        """Send these events now, synchronously, from this process.

        Returns True when the API accepted them all; raises ``InvalidEvent``
        before sending anything if one is invalid, and ``PublishError`` when
        the API refused any or could not be reached.
        """
        payloads = self._encoder.encode_many(events)
        if not payloads:
            return True
        cfg = self.config
        transport = Transport(cfg.endpoint, cfg.send_timeout_s, cfg.compression, cfg.compression_level)
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

        The one wait that may overrun ``timeout`` is for a publisher this call
        has just started, when none ran (up to 10 s)."""
        deadline = time.monotonic() + (self.config.ipc_timeout_s if timeout is None else timeout)
        while self._staged or self._pending or self._unreported_dropped:
            if time.monotonic() >= deadline:
                return False
            if not self._ship_once(deadline=deadline):
                wait = min(self._retry_wait(), deadline - time.monotonic())
                if wait > 0:
                    time.sleep(wait)
                self._next_connect = 0.0
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
        if not self._ship_lock.acquire(timeout=left):
            return False
        try:
            conn = self._connection(deadline=deadline)
            left = max(deadline - time.monotonic(), 0.01)
            return bool(conn.call("flush", left, timeout=left + self.config.ipc_timeout_s))
        except (IPCError, ChannelError, EOFError, OSError) as exc:
            self._drop_connection()
            log.warning("samsara_mp: flush could not reach the publisher: %s", exc)
            return False
        finally:
            self._ship_lock.release()

    def stats(self) -> dict[str, Any]:
        """This process's counters, and the channel's from its publisher when reachable."""
        with self._lock:
            pending = len(self._pending[1]) if self._pending else 0
            local = {
                "recorded": self._recorded,
                "staged": len(self._staged) + pending,
                "dropped_staging": self._staging_dropped,
                "unreported_recorded": self._unreported_recorded
                + (self._pending[2] if self._pending else 0),
                "unreported_dropped": self._unreported_dropped
                + (self._pending[3] if self._pending else 0),
                "threaded": self._threaded,
                "pid": os.getpid(),
                "channel": self.channel.name,
            }
        result: dict[str, Any] = {"local": local, "channel": None}
        try:
            with self._ship_lock:
                result["channel"] = self._connection(elect=False).call("stats")
        except (IPCError, ChannelError, EOFError, OSError) as exc:
            self._drop_connection()
            result["error"] = str(exc)
            return result
        chan = dict(result["channel"])
        # Events staged here are recorded but not yet known to the publisher.
        chan["recorded"] += local["unreported_recorded"]
        chan["dropped_overflow"] += local["unreported_dropped"]
        chan["dropped_staging"] += local["unreported_dropped"]
        chan["staged"] = local["staged"]
        result["channel"] = chan
        return result

    def close(self, timeout: float | None = None) -> bool:
        """Ship what is staged, stop the shipper, disconnect; True when nothing was left."""
        if self._closed:
            return True
        if timeout is None:
            timeout = self.config.ipc_timeout_s * 2
        shipped = self.ship(timeout)
        self._closed = True
        self._stopping.set()
        self._wake.set()
        if self._shipper is not None and self._shipper is not threading.current_thread():
            self._shipper.join(timeout=max(self.config.ipc_timeout_s, 1.0))
        self._drop_connection()
        process.unregister(self)
        return shipped

    def __enter__(self) -> SamsaraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _uwsgi_without_threads() -> bool:
    try:
        uwsgi = importlib.import_module("uwsgi")
    except ImportError:
        return False
    # uWSGI 2.0 says whether Python threads run here; --enable-threads alone is not it.
    return not getattr(uwsgi, "has_threads", 0)

