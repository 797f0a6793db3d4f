"""The shipper: moves a process's staged events into the ring, as fast as it has room.

Each push carries the oldest staged events and this process's cumulative
counts; the answer says how many the ring took and how much room this
process has left (its credit). What was not taken goes back to the front of
staging, and the next push is sized to the credit, so a burst waits in
staging instead of overflowing the ring. A push keeps its sequence number
until it is answered, so a resend after a lost answer is recognised and
never duplicates. The thread starts at the first staged event; where no
thread can run (uWSGI without threads) ``record_event`` ships inline and
never waits on the publisher (docs/design.md, "Staging and backpressure").
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import threading
import time
from typing import Any

from ._flush import Holders
from ._link import Link, bounded
from ._staging import Push, Staging
from .config import Config
from .errors import ChannelError
from .ipc import Connection, IPCError, Refused
from .retry import RetryPolicy
from .supervise import Supervisor

__all__ = ["Shipper", "INLINE_BUDGET"]

log = logging.getLogger("samsara_mp")

# What record_event may spend on one inline attempt: a connect and handshake
# with a healthy publisher, or one non-blocking write.
INLINE_BUDGET = 0.004
# Before the first answer says how much room there is.
_FIRST_CREDIT = 1024
# While the ring has no room for this process: ask again soon, less often the longer it lasts.
_NO_ROOM = RetryPolicy(base=0.005, cap=0.1)
_PROBE = 64
_THREAD_RESTART = RetryPolicy(base=0.05, cap=1.0)


class Shipper:
    """Pushes one process's staged events to the publisher; owns the shipper thread."""

    def __init__(self, config: Config, link: Link, staging: Staging) -> None:
        self.config = config
        self.link = link
        self.staging = staging
        mode = config.shipper
        self.inline = mode == "inline" or (mode == "auto" and _uwsgi_without_threads())
        self.holders = Holders()
        self.reset()

    def reset(self) -> None:
        """Fresh per-process state (at construction, and in the child of a fork)."""
        self.client_id = f"{os.getpid()}-{os.urandom(6).hex()}"
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        # The shipper must never die silently, nor give up: it is what ships at all.
        self.supervisor = Supervisor(self.stopping, _THREAD_RESTART, give_up_after=None)
        self.pending: Push | None = None
        self.credit = _FIRST_CREDIT
        self.no_room = 0  # answers in a row that took less than was pushed
        self.reported = (0, 0, 0)  # the staging totals the publisher has
        # A publisher counts from its own start: totals are sent less what they were
        # when this process first reached it (``base``).
        self.instance: str | None = None
        self.base = (0, 0, 0)
        self.awaiting = False  # an inline push was written; its answer is not read yet
        self.was_sent = False
        self.sent_at = 0.0
        self.holders.reset()

    def after_fork(self) -> None:
        self.link.after_fork()
        self.reset()

    def has_work(self) -> bool:
        """Events staged or in a push, or counts the publisher has not been told."""
        return bool(len(self.staging) or self.pending or self.awaiting
                    or self.totals() != self.reported)

    # ---- the thread ----
    def start_thread(self) -> bool:
        """Start the shipper thread (once); False when this process ships inline."""
        if self.inline:
            return False
        if self.thread is not None or self.stopping.is_set():
            return self.thread is not None
        try:
            thread = threading.Thread(target=self._run, name="samsara-mp-shipper", daemon=True)
            thread.start()
        except RuntimeError:
            log.info("samsara_mp: no thread can start here; shipping from record_event")
            self.inline = True
            return False
        self.thread = thread
        return True

    def stop_thread(self, timeout: float) -> bool:
        """Ask the thread to stop and wait up to ``timeout``; True when it has ended."""
        self.stopping.set()
        self.wake.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def thread_errors(self) -> int:
        return self.supervisor.errors

    def _run(self) -> None:
        self.supervisor.run("shipper thread", self._ship_loop)
        if self.link.enter(None):
            try:
                self.link.drop_connection()  # stopped by close(), which may have left it to us
            finally:
                self.link.leave()

    def _ship_loop(self) -> None:
        delay = self.config.ship_delay_s
        staging = self.staging
        batch = self.config.ship_batch
        while not self.stopping.is_set():
            self.wake.wait()
            self.wake.clear()
            # Wait for a full batch, but no longer than ship_delay after the first event.
            deadline = staging.since + delay
            while len(staging) < batch and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wake.wait(left)
                self.wake.clear()
            while self.has_work() and not self.stopping.is_set():
                if not self.ship_once():
                    self.stopping.wait(self.retry_wait())
            if len(staging) and not self.stopping.is_set():
                self.wake.set()

    def retry_wait(self) -> float:
        """How long to wait after a push that did not go whole."""
        if self.no_room:
            return _NO_ROOM.delay(self.no_room)
        return max(self.link.next_connect - time.monotonic(), self.config.ship_delay_s, 0.01)

    # ---- pushing ----
    def ship_once(self, deadline: float | None = None) -> bool:
        """Push one batch, waiting (bounded) for the answer; True when the ring took all
        of it, False when it had no room for all, or the publisher could not be reached."""
        link = self.link
        if not link.enter(None if deadline is None else deadline - time.monotonic()):
            return False  # mid-push (the thread, or the code a signal handler interrupted)
        try:
            ipc = self.config.ipc_timeout_s
            if self.awaiting and not self.read_answer(bounded(ipc, deadline)):
                return False
            try:
                conn = link.connection(deadline=deadline)
            except (IPCError, ChannelError, OSError) as exc:
                self._unreachable(exc)
                return False
            try:
                self._meet(conn, bounded(ipc, deadline))
            except (IPCError, EOFError, OSError) as exc:
                link.drop_connection()
                self._unreachable(exc)
                return False
            push = self._next_push()
            self.was_sent, push.sent = push.sent, True
            totals = self.totals()
            try:
                answer = conn.call("push", push.payloads, self.client_id, push.seq, totals,
                                   timeout=bounded(ipc, deadline))
            except (IPCError, EOFError, OSError) as exc:
                if isinstance(exc, Refused):
                    push.sent = self.was_sent  # answered, not taken
                # Taken or not: resent with the same seq, which the ring recognises.
                link.drop_connection()
                self._unreachable(exc)
                return False
            return self._answered(conn, push, totals, answer)
        finally:
            link.leave()

    def ship_inline(self) -> None:
        """From ``record_event`` without a thread: push without ever waiting on the publisher."""
        link = self.link
        now = time.monotonic()
        if now < link.next_connect or not link.enter(0.0):
            return
        try:
            if self.awaiting:
                conn = link.conn
                if conn is None or not conn.poll(0):
                    if now - self.sent_at > self.config.ipc_timeout_s:
                        link.drop_connection()
                        self._unreachable(IPCError(errno.ETIMEDOUT, "no answer to a push in time"))
                    return
                if not self.read_answer(INLINE_BUDGET) or not len(self.staging):
                    return
            try:
                conn = link.connection(deadline=now + INLINE_BUDGET, wait=False)
            except (IPCError, ChannelError, OSError) as exc:
                self._unreachable(exc)
                return
            try:
                self._meet(conn, INLINE_BUDGET)
            except (IPCError, EOFError, OSError) as exc:
                link.drop_connection()
                self._unreachable(exc)
                return
            push = self._next_push()
            self.was_sent, push.sent = push.sent, True
            self._inline_totals = self.totals()
            conn.timeout = INLINE_BUDGET
            try:
                conn.send(("push", (push.payloads, self.client_id, push.seq, self._inline_totals)))
            except (IPCError, OSError) as exc:
                # A partial write leaves the stream unusable; resend on a new connection.
                link.drop_connection()
                self._unreachable(exc)
                return
            finally:
                conn.timeout = self.config.ipc_timeout_s
            self.awaiting = True
            self.sent_at = now
        finally:
            link.leave()

    def read_answer(self, timeout: float) -> bool:
        """Read the answer to an inline push (holding the link); True when all was taken."""
        conn = self.link.conn
        self.awaiting = False
        if conn is None or self.pending is None:
            return False
        saved = conn.timeout
        conn.timeout = max(timeout, 0.001)
        try:
            kind, value = conn.recv()
        except (IPCError, EOFError, OSError) as exc:
            self.link.drop_connection()
            self._unreachable(exc)
            return False
        finally:
            conn.timeout = saved
        if kind != "ok":
            self.pending.sent = self.was_sent  # answered, not taken
            self.link.drop_connection()
            self._unreachable(Refused(errno.EPROTO, f"publisher refused push: {value}"))
            return False
        return self._answered(conn, self.pending, self._inline_totals, value)

    _inline_totals: tuple[int, int, int] = (0, 0, 0)

    def totals(self) -> tuple[int, int, int]:
        """This process's counts as the current publisher is to know them."""
        return tuple(now - then for now, then in zip(self.staging.totals(), self.base, strict=True))  # type: ignore[return-value]

    def _meet(self, conn: Connection, timeout: float) -> None:
        """Learn which publisher ``conn`` reaches; a new one counts from here on."""
        instance = self.link.identity(conn, timeout)
        if instance != self.instance:
            if self.instance is not None:
                self.base, self.reported = self.reported_abs, (0, 0, 0)
            self.instance = instance

    @property
    def reported_abs(self) -> tuple[int, int, int]:
        return tuple(a + b for a, b in zip(self.reported, self.base, strict=True))  # type: ignore[return-value]

    def _answered(self, conn: Connection, push: Push, totals: tuple[int, int, int],
                  answer: Any) -> bool:
        try:
            taken, room, instance = answer
            taken, room = int(taken), int(room)
        except (TypeError, ValueError):
            self.link.drop_connection()
            self._unreachable(IPCError(errno.EPROTO, f"a push answered with {type(answer).__name__}"))
            return False
        taken = min(max(taken, 0), len(push.payloads))
        self.staging.put_back(push.payloads[taken:])  # no room for them yet: they wait here
        self.pending = None
        self.reported = totals
        self.credit = room
        self.link.reached()
        if taken:
            self.holders.took(conn, str(instance))
        if taken < len(push.payloads):
            self.no_room += 1
            return False
        self.no_room = 0
        return True

    def _next_push(self) -> Push:
        """The push to send: the one not yet answered, or the oldest staged events
        that fit the credit and one write (possibly none: a report of counts)."""
        if self.pending is None:
            # No credit: the publisher holds such a push until some room opens, so it
            # carries a fair amount, less the longer the ring stays full (an outage).
            want = self.credit if self.credit > 0 else max(_FIRST_CREDIT >> min(self.no_room, 4), _PROBE)
            # One write per push: each further write must win the GIL back from a busy
            # recording thread.
            conn = self.link.conn
            limit = conn.sndbuf // 2 if conn is not None else 1 << 20
            push = self.staging.take(limit, min(want, self.config.ship_batch * 64))
            if push is None:
                self.staging.push_seq += 1
                push = Push(self.staging.push_seq, [])
            self.pending = push
        return self.pending

    def _unreachable(self, exc: BaseException) -> None:
        if self.pending is not None and not self.pending.sent:
            self.staging.put_back(self.pending.payloads)  # it never left: back in order
            self.pending = None
        self.link.unreachable(exc, len(self.staging))


def _uwsgi_without_threads() -> bool:
    try:
        uwsgi = importlib.import_module("uwsgi")
    except ImportError:
        return False
    # uWSGI 2.0 says whether Python threads run here; --enable-threads alone is not it.
    return not getattr(uwsgi, "has_threads", 0)
