"""Shipping: moving a process's staged events to the channel's publisher.

A :class:`Shipper` owns one process's connection to the publisher, the push
in flight (resent with the same sequence number until acknowledged, so IPC
retries never duplicate), the election when no publisher answers, and the
optional shipper thread. The thread starts lazily, at the first staged event,
so a process that only made a client (a gunicorn master with ``preload_app``,
a Pool's parent) stays single-threaded when it forks. Where no thread can run
(uWSGI without threads), ``record_event`` ships inline and never waits on the
publisher: a push is written without waiting and its answer is read by a
later call, and every connection attempt there is cut to a few milliseconds.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import socket
import threading
import time
from typing import Any, NamedTuple

from .channel import Channel, Launch
from .config import Config
from .errors import ChannelError
from .ipc import Connection, IPCError, IPCTimeout, Refused
from .staging import Push, Staging

__all__ = ["Shipper", "Holder", "INLINE_BUDGET"]


class Holder(NamedTuple):
    """A publisher that took pushes no flush has answered for yet."""

    number: int  # of the last push it took
    process: tuple[int, int | None] | None  # (pid, start time), when the system names it

log = logging.getLogger("samsara_mp")

_CONNECT_BACKOFF_MAX = 2.0
# What record_event may spend on one inline attempt: a connect and handshake
# (about 0.3 ms with a healthy publisher), or one non-blocking write.
INLINE_BUDGET = 0.004
# How long a publisher this process launched is given to come up.
_START_WAIT = 10.0


class Shipper:
    """Pushes one process's staged events to the publisher; owns its connection and thread."""

    def __init__(self, config: Config, channel: Channel, staging: Staging) -> None:
        self.config = config
        self.channel = channel
        self.staging = staging
        mode = config.shipper
        self.inline = mode == "inline" or (mode == "auto" and _uwsgi_without_threads())
        self.reset()

    def reset(self) -> None:
        """Fresh per-process state (at construction, and in the child of a fork)."""
        self.client_id = f"{os.getpid()}-{os.urandom(6).hex()}"
        self.lock = threading.RLock()  # one push at a time on the connection
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.thread_errors = 0
        self.conn: Connection | None = None
        self.pending: Push | None = None
        self.awaiting = False  # pending was written inline; its answer is not read yet
        self.was_sent = False  # whether an inline push awaiting its answer was sent before
        self.sent_at = 0.0
        self.next_connect = 0.0
        self.failures = 0
        # flush() waits on a connection of its own (a wait out of a Retry-After can be
        # long), opened at the first flush and kept, so that the wait never holds ``conn``.
        self.flush_lock = threading.Lock()
        self.flush_conn: Connection | None = None
        self.retired = False  # close() ran: no connection is kept open from now on
        # The publishers (by instance id) that took pushes no flush has answered for
        # yet: the number of the last push each took, and its process (pid, start
        # time) when the system names it. A flush answered by another than one
        # holding events is not done (they may have gone with a killed publisher).
        self.pushes_acked = 0
        self.unflushed_peers: dict[str, Holder] = {}
        # The thread's took() against flushes settling; an RLock, as a signal handler
        # may flush while the code it interrupted settles one.
        self.peers_lock = threading.RLock()

    def took(self, conn: Connection, answer: Any) -> None:
        """A push was acknowledged on ``conn`` (under the lock) with ``answer``:
        (events dropped, the publisher's instance id); an older publisher sends
        the number alone, and is not tracked."""
        self.pushes_acked += 1
        if conn.instance is None:
            known = isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[1], str)
            conn.instance = answer[1] if known else ""
        if conn.instance:
            with self.peers_lock:
                self.unflushed_peers[conn.instance] = Holder(self.pushes_acked, conn.peer())

    def identity(self, conn: Connection, timeout: float) -> str:
        """The instance id of the publisher at ``conn`` ("" for an older one), asked
        once per connection when no push has told it."""
        if conn.instance is None:
            try:
                answer = conn.call("instance", timeout=timeout)
            except Refused:
                answer = ""  # an older publisher: no such request
            conn.instance = answer if isinstance(answer, str) else ""
        return conn.instance

    def reentered(self) -> bool:
        """True in a signal handler that interrupted this thread while it held the
        connection (mid-push, mid-call): the connection is not usable from there."""
        return bool(self.lock._is_owned())  # type: ignore[attr-defined]

    def enter(self, timeout: float | None) -> bool:
        """Take the connection's lock (``timeout`` None: wait), never re-entering
        it: a signal handler's messages would land in the middle of the
        interrupted push's, and its read would take that push's answer."""
        if self.reentered():
            return False
        if timeout is None:
            return self.lock.acquire()
        return self.lock.acquire(timeout=max(timeout, 0.0))

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections, push and thread."""
        conns = (self.conn, self.flush_conn)
        self.reset()
        for conn in conns:
            if conn is not None:
                try:
                    os.close(conn.fileno())
                except OSError:
                    pass
                conn._handle = None  # type: ignore[attr-defined]

    # ---- the thread ----
    def start_thread(self) -> bool:
        """Start the shipper thread (once); False when this process ships inline."""
        if self.inline:
            return False
        with self.lock:
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
        """Ask the thread to stop and wait up to ``timeout``; True when it has ended
        (or never ran)."""
        self.stopping.set()
        self.wake.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def close_connection(self, thread_ended: bool, timeout: float) -> None:
        """Close the connections at ``close()``, waiting up to ``timeout`` for a call
        still on one. One still in use (the thread stuck in a push, another thread in
        ``stats()`` or ``flush()``) is only shut down: that wakes its user with an
        error, and the user closes the descriptor itself, so the number is never
        reused under it (a file the application opened next would get its reads
        and writes)."""
        self.retired = True
        if self.enter(timeout if thread_ended else 0.0):
            try:
                self.drop_connection()
            finally:
                self.lock.release()
        else:
            _shut_down(self.conn)
        if self.flush_lock.acquire(blocking=False):
            try:
                self._drop_flush_conn()
            finally:
                self.flush_lock.release()
        else:
            _shut_down(self.flush_conn)

    def _run(self) -> None:
        # Supervised: an unexpected error is logged and counted, and the loop goes on.
        while not self.stopping.is_set():
            try:
                self._ship_loop()
            except Exception:  # noqa: BLE001 - the shipper must never die silently
                self.thread_errors += 1
                log.exception("samsara_mp: shipper thread error %d; carrying on", self.thread_errors)
                self.stopping.wait(min(0.05 * self.thread_errors, 1.0))
        with self.lock:
            self.drop_connection()  # stopped by close(), which may have left it to us

    def _ship_loop(self) -> None:
        delay = self.config.ship_delay_s
        staging = self.staging
        batch = self.config.ship_batch
        while not self.stopping.is_set():
            self.wake.wait()
            self.wake.clear()
            if self.stopping.is_set():
                return
            # Wait for a full batch, but no longer than ship_delay after the first event.
            deadline = staging.since + delay
            while len(staging) < batch and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wake.wait(left)
                self.wake.clear()
            while (staging.has_work() or self.pending) and not self.stopping.is_set():
                if not self.ship_once():
                    self.stopping.wait(self.retry_wait())
                    break
            if staging.has_work() and not self.stopping.is_set():
                self.wake.set()

    def retry_wait(self) -> float:
        return max(self.next_connect - time.monotonic(), self.config.ship_delay_s, 0.01)

    # ---- pushing ----
    def ship_once(self, deadline: float | None = None) -> bool:
        """Push one batch, waiting (bounded) for the answer; False when the
        publisher could not be reached (or, with a ``deadline``, not within it)."""
        if not self.enter(None if deadline is None else deadline - time.monotonic()):
            return False  # mid-push (the thread, or the code a signal handler interrupted)
        try:
            if self.awaiting and not self.read_answer(self._bounded(self.config.ipc_timeout_s, deadline)):
                return False
            try:
                conn = self.connection(deadline=deadline)
            except (IPCError, ChannelError, OSError) as exc:
                self.note_unreachable(exc)
                return False
            push = self._next_push(conn)
            if push is None:
                return True
            was_sent, push.sent = push.sent, True
            try:
                answer = conn.call("push", push.payloads, self.client_id, push.seq, push.recorded,
                                   push.dropped, push.filtered, push.sampled_out,
                                   timeout=self._bounded(self.config.ipc_timeout_s, deadline))
            except (IPCError, EOFError, OSError) as exc:
                if isinstance(exc, Refused):
                    # Answered, not taken: only an earlier attempt's may be held.
                    push.sent = was_sent
                # The publisher may or may not have taken it: keep the push as
                # it is, and resend it with the same seq, which the buffer
                # ignores if it already has it.
                self.drop_connection()
                self.note_unreachable(exc)
                return False
            self.pending = None
            self.failures = 0
            self.took(conn, answer)
            return True
        finally:
            self.lock.release()

    def ship_inline(self) -> None:
        """From ``record_event`` without a thread: push without ever waiting on the publisher."""
        now = time.monotonic()
        if now < self.next_connect or not self.enter(0.0):
            return
        try:
            if self.awaiting:
                conn = self.conn
                if conn is None or not conn.poll(0):
                    if now - self.sent_at > self.config.ipc_timeout_s:
                        self.drop_connection()
                        self.note_unreachable(IPCError(errno.ETIMEDOUT, "no answer to a push in time"))
                    return
                if not self.read_answer(INLINE_BUDGET):
                    return
            try:
                conn = self.connection(deadline=now + INLINE_BUDGET, wait=False)
            except (IPCError, ChannelError, OSError) as exc:
                self.note_unreachable(exc)
                return
            push = self._next_push(conn)
            if push is None:
                return
            self.was_sent, push.sent = push.sent, True
            conn.timeout = INLINE_BUDGET
            try:
                conn.send(("push", (push.payloads, self.client_id, push.seq, push.recorded, push.dropped,
                                    push.filtered, push.sampled_out)))
            except (IPCError, OSError) as exc:
                # A partial write leaves the stream unusable; resend on a new connection.
                self.drop_connection()
                self.note_unreachable(exc)
                return
            finally:
                conn.timeout = self.config.ipc_timeout_s
            self.awaiting = True
            self.sent_at = now
        finally:
            self.lock.release()

    def read_answer(self, timeout: float) -> bool:
        """Read the answer to an inline push; True when it was acknowledged."""
        conn = self.conn
        self.awaiting = False
        if conn is None:
            return False
        saved = conn.timeout
        conn.timeout = max(timeout, 0.001)
        try:
            kind, value = conn.recv()
        except (IPCError, EOFError, OSError) as exc:
            self.drop_connection()
            self.note_unreachable(exc)
            return False
        finally:
            conn.timeout = saved
        if kind != "ok":
            if self.pending is not None:
                self.pending.sent = self.was_sent  # answered, not taken
            self.drop_connection()
            self.note_unreachable(Refused(errno.EPROTO, f"publisher refused push: {value}"))
            return False
        self.pending = None
        self.failures = 0
        self.took(conn, value)
        return True

    def _next_push(self, conn: Connection) -> Push | None:
        """The push to send: the one not yet acknowledged, or a new one sized to one write."""
        if self.pending is None:
            # One write per push: each further write must win the GIL back
            # from a busy recording thread, up to a switch interval each.
            self.pending = self.staging.take(conn.sndbuf // 2, self.config.ship_batch)
        return self.pending

    def note_unreachable(self, exc: BaseException) -> None:
        if self.pending is not None and not self.pending.sent:
            self.staging.put_back(self.pending)  # it never left: back in order, within the bounds
            self.pending = None
        self.failures += 1
        backoff = min(0.05 * (2 ** min(self.failures - 1, 8)), _CONNECT_BACKOFF_MAX)
        self.next_connect = time.monotonic() + backoff
        if self.failures in (1, 10) or self.failures % 100 == 0:
            log.warning(
                "samsara_mp: publisher of channel %s unreachable (%s); %d events staged",
                self.channel.name, str(exc) or type(exc).__name__, len(self.staging),
            )

    @staticmethod
    def _bounded(timeout: float, deadline: float | None) -> float:
        """``timeout``, cut to what is left before ``deadline`` (at least 1 ms)."""
        if deadline is None:
            return timeout
        return max(min(timeout, deadline - time.monotonic()), 0.001)

    # ---- connecting and electing ----
    def connection(
        self, elect: bool = True, deadline: float | None = None, wait: bool = True
    ) -> Connection:
        """The open connection, or a new one (electing a publisher when none answers)."""
        if self.conn is not None:
            return self.conn
        timeout = self.config.ipc_timeout_s
        try:
            conn = self.channel.connect(self._bounded(timeout, deadline))
        except IPCError:
            if not (elect and self.config.start_publishing_thread):
                raise
            elected = self.elect(wait, deadline)
            if elected is None:
                raise
            conn = elected
        conn.timeout = timeout  # later calls get the full bound, not what the deadline left
        self.conn = conn
        return conn

    def elect(self, wait: bool = True, deadline: float | None = None) -> Connection | None:
        """No publisher answers: launch one unless one is starting, then (if ``wait``)
        wait for it; the connection to it, or None."""
        launch, proc = self.channel.launch_publisher()
        if not wait:
            return None  # record_event ships inline: never wait for a start there
        if launch is Launch.SERVING:
            # A publisher holds the lock: it is starting, or hung; wait a little.
            return self.channel.connect_when_up(self._bounded(self.config.ipc_timeout_s, deadline))
        # Ours or another process's launch is in flight. Not cut by the deadline:
        # a start is let come up (the one wait ship(timeout) may overrun);
        # otherwise a short ship, as uWSGI's after-request hook does, could never elect one.
        conn = self.channel.connect_when_up(max(self.config.ipc_timeout_s, _START_WAIT), proc)
        if conn is None and not self.channel.lock_is_free():
            # Ours lost the election to one that is still starting, or is hung.
            conn = self.channel.connect_when_up(self.config.ipc_timeout_s)
        return conn

    def drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        self.awaiting = False
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _drop_flush_conn(self) -> None:
        conn, self.flush_conn = self.flush_conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def wait_flushed(self, deadline: float) -> tuple[bool | None, str | None, int]:
        """The publisher's answer to a flush until ``deadline`` (the call bounded by it
        plus one ``ipc_timeout``), on the kept flush connection, or on one of its own
        while another thread's flush holds that; None when no publisher answers.
        With it, which publisher answered (its instance id) and the number of the
        last push acknowledged before the request: what it answers for."""
        ipc = self.config.ipc_timeout_s
        if not self.flush_lock.acquire(blocking=False):
            # Another thread's flush holds the kept connection: one of our own.
            try:
                conn = self.channel.connect(self._bounded(ipc, deadline))
            except IPCError:
                return None, None, 0
            try:
                who = self.identity(conn, self._bounded(ipc, deadline))
                wait = max(deadline - time.monotonic(), 0.001)
                covers = self.pushes_acked
                return bool(conn.call("flush", wait, timeout=wait + ipc)), who, covers
            finally:
                conn.close()
        try:
            if deadline - time.monotonic() <= 0:
                return False, None, 0
            kept = self.flush_conn
            if kept is not None and _peer_gone(kept):
                # The publisher it reached has gone since an earlier flush: not this
                # flush's publisher, so a new connection, not an error.
                self._drop_flush_conn()
            if self.flush_conn is None:
                try:
                    conn = self.channel.connect(self._bounded(ipc, deadline))
                except IPCError:
                    return None, None, 0
                if self.retired:
                    conn.close()  # a close() came meanwhile: keep nothing open
                    return None, None, 0
                self.flush_conn = conn
            conn = self.flush_conn
            try:
                who = self.identity(conn, self._bounded(ipc, deadline))
                wait = max(deadline - time.monotonic(), 0.001)
                covers = self.pushes_acked
                return bool(conn.call("flush", wait, timeout=wait + ipc)), who, covers
            except (EOFError, OSError):
                # The publisher went while it flushed (killed, say): what it held
                # may be lost, so this flush is not done, whoever answers next.
                self._drop_flush_conn()
                raise
        finally:
            if self.retired:
                self._drop_flush_conn()
            self.flush_lock.release()

    def call(
        self, method: str, *args: Any, timeout: float, elect: bool = False, deadline: float | None = None,
        held: bool = False, with_peer: bool = False,
    ) -> Any:
        """One request on this process's connection, retried once on a connection
        that died (the publisher was replaced since it was opened).

        ``timeout`` bounds the whole call, the wait for the connection's lock
        included (the shipper thread may hold it through a push to a stuck
        publisher), so that ``stats()`` takes ``ipc_timeout`` at most.
        ``held``: the caller holds the lock already (``stats()``). ``with_peer``:
        the answer comes with the instance id of the publisher that gave it."""
        end = time.monotonic() + timeout
        if self.retired:
            # After close(): one call on a connection of its own, closed at once.
            conn = self.channel.connect(self._bounded(self.config.ipc_timeout_s, end))
            try:
                who = self.identity(conn, self._bounded(timeout, end)) if with_peer else ""
                value = conn.call(method, *args, timeout=self._bounded(timeout, end))
                return (value, who) if with_peer else value
            finally:
                conn.close()
        if held:
            self.lock.acquire()  # re-entered by its holder, on purpose
        elif self.reentered():
            raise IPCError(errno.EBUSY, "called from a signal handler that interrupted a push")
        elif not self.lock.acquire(timeout=timeout):
            raise IPCTimeout(errno.ETIMEDOUT, "the connection stayed busy with a push")
        try:
            for attempt in (1, 2):
                if self.awaiting:
                    self.read_answer(self._bounded(self.config.ipc_timeout_s, end))
                fresh = self.conn is None
                try:
                    conn = self.connection(elect=elect, deadline=deadline if elect else end)
                    who = self.identity(conn, self._bounded(timeout, end)) if with_peer else ""
                    value = conn.call(method, *args, timeout=self._bounded(timeout, end))
                    return (value, who) if with_peer else value
                except (EOFError, OSError) as exc:
                    self.drop_connection()
                    if fresh or attempt == 2 or isinstance(exc, TimeoutError):
                        raise
        finally:
            if self.retired:
                self.drop_connection()  # close() ran meanwhile (a signal handler): keep nothing
            self.lock.release()
        raise AssertionError("unreachable")  # pragma: no cover


def _shut_down(conn: Connection | None) -> None:
    """Wake whoever waits on ``conn`` with an error, leaving its descriptor open."""
    if conn is None or conn.closed:
        return
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _uwsgi_without_threads() -> bool:
    try:
        uwsgi = importlib.import_module("uwsgi")
    except ImportError:
        return False
    # uWSGI 2.0 says whether Python threads run here; --enable-threads alone is not it.
    return not getattr(uwsgi, "has_threads", 0)


def _peer_gone(conn: Connection) -> bool:
    """True when the peer closed ``conn`` (nothing else is ever unread on a flush
    connection between calls), or it is unusable."""
    try:
        return bool(conn.poll(0))
    except (OSError, EOFError, ValueError):
        return True

