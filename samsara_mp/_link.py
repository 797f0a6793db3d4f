"""A process's link to its channel's publisher: the connection, its lock, the election.

Every call on the link is bounded in time. The link's lock is held for one
message exchange at a time; a signal handler that interrupts the thread that
holds it must not use the connection (its bytes would land inside the
interrupted message), which :meth:`Link.reentered` tells. Flushes wait on a
connection of their own, so a long wait never holds the push connection
(docs/design.md, "Workers").

The lock is of the kind ``threading.Lock`` makes when it is first taken, not when
the link was made: gevent's gunicorn worker monkey-patches after the fork, so a
link reset at the fork (``preload_app``) made a native lock, which a greenlet
holds across a cooperative socket wait while another greenlet's ``acquire``
blocks the whole process, the holder included (a hung worker); see
docs/design.md, "Threads and the GIL".
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from typing import Any

from .channel import Channel, Launch
from .config import Config
from .ipc import Connection, IPCError, IPCTimeout, Refused
from .retry import RetryPolicy

__all__ = ["Link", "bounded"]

log = logging.getLogger("samsara_mp")

# How long a publisher this process launched is given to come up.
_START_WAIT = 10.0
# Reconnect attempts: quick at first, never more often than this cap once down.
_RECONNECT = RetryPolicy(base=0.05, cap=2.0)


def bounded(timeout: float, deadline: float | None) -> float:
    """``timeout``, cut to what is left before ``deadline`` (at least 1 ms)."""
    if deadline is None:
        return timeout
    return max(min(timeout, deadline - time.monotonic()), 0.001)


class Link:
    """The connections of one process to the publisher, and whom they reached."""

    def __init__(self, config: Config, channel: Channel) -> None:
        self.config = config
        self.channel = channel
        self.reset()

    def reset(self) -> None:
        """Fresh per-process state (at construction, and in the child of a fork)."""
        self.lock = threading.Lock()  # one exchange at a time on ``conn``
        self._lock_kind: object = threading.Lock  # what made it (see _current_lock)
        self._holder: int | None = None  # the thread that holds it
        self.conn: Connection | None = None
        self.flush_lock = threading.Lock()
        self.flush_conn: Connection | None = None
        self.retired = False  # close() ran: no connection is kept open from now on
        self.failures = 0
        self.next_connect = 0.0

    # ---- the lock ----
    def reentered(self) -> bool:
        """True in a signal handler that interrupted this thread while it held the
        connection (mid-push, mid-call): the connection is not usable from there."""
        return self._holder == threading.get_ident()

    def enter(self, timeout: float | None) -> bool:
        """Take the connection's lock (``timeout`` None: wait), never re-entering it."""
        if self.reentered():
            return False
        end = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            lock = self._current_lock()
            if end is None:
                got = lock.acquire()
            else:
                got = lock.acquire(timeout=max(end - time.monotonic(), 0.0))
            if not got:
                return False
            if lock is self.lock:
                break
            lock.release()  # replaced while this thread waited for it: take the new one
        self._holder = threading.get_ident()
        return True

    def _current_lock(self) -> Any:
        """The lock, made anew when ``threading`` was monkey-patched since it was made
        (gevent's worker patches after the fork) and nobody holds it."""
        if self._lock_kind is not threading.Lock and self.lock.acquire(blocking=False):
            old = self.lock
            self.lock, self._lock_kind = threading.Lock(), threading.Lock
            old.release()
        return self.lock

    def leave(self) -> None:
        self._holder = None
        self.lock.release()

    # ---- connecting and electing ----
    def connection(self, elect: bool = True, deadline: float | None = None,
                   wait: bool = True) -> Connection:
        """The open connection, or a new one (electing a publisher when none answers)."""
        if self.conn is not None:
            return self.conn
        timeout = self.config.ipc_timeout_s
        try:
            conn = self.channel.connect(bounded(timeout, deadline))
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
        ipc = self.config.ipc_timeout_s
        if launch is Launch.SERVING:
            # A publisher holds the lock: it is starting, hung, or just dying (a killed
            # one's lock can outlive it by a moment). Wait a little, launching one as soon
            # as the lock is free.
            end = time.monotonic() + bounded(ipc, deadline)
            while True:
                conn = self.channel.connect_when_up(min(0.25, max(end - time.monotonic(), 0.01)))
                if conn is not None or time.monotonic() >= end:
                    return conn
                launch, proc = self.channel.launch_publisher()
                if launch is not Launch.SERVING:
                    break
        # A launch is in flight. Not cut by the deadline: a start is let come up (the one
        # wait ship(timeout) may overrun), or a short ship could never elect one.
        conn = self.channel.connect_when_up(max(ipc, _START_WAIT), proc)
        if conn is None and not self.channel.lock_is_free():
            conn = self.channel.connect_when_up(ipc)  # lost to one that is still starting
        return conn

    def unreachable(self, exc: BaseException, staged: int) -> None:
        """Count a failure to reach the publisher and set when to try again."""
        self.failures += 1
        self.next_connect = time.monotonic() + _RECONNECT.ceiling(self.failures)
        if self.failures in (1, 10) or self.failures % 100 == 0:
            log.warning("samsara_mp: publisher of channel %s unreachable (%s); %d events staged",
                        self.channel.name, str(exc) or type(exc).__name__, staged)

    def reached(self) -> None:
        self.failures = 0

    def drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        _close(conn)

    def identity(self, conn: Connection, timeout: float) -> str:
        """The instance id of the publisher at ``conn``, asked once per connection."""
        if conn.instance is None:
            answer = conn.call("instance", timeout=timeout)
            conn.instance = answer if isinstance(answer, str) else ""
        return conn.instance

    def call(self, method: str, *args: Any, timeout: float, elect: bool = False,
             deadline: float | None = None, held: bool = False, with_peer: bool = False) -> Any:
        """One request on this process's connection, retried once on a connection that
        died (the publisher was replaced since it was opened).

        ``timeout`` bounds the whole call, the wait for the lock included.
        ``held``: the caller holds the lock already. ``with_peer``: the answer comes
        with the instance id of the publisher that gave it."""
        end = time.monotonic() + timeout
        if self.retired:
            # After close(): one call on a connection of its own, closed at once.
            conn = self.channel.connect(bounded(self.config.ipc_timeout_s, end))
            try:
                who = self.identity(conn, bounded(timeout, end)) if with_peer else ""
                value = conn.call(method, *args, timeout=bounded(timeout, end))
                return (value, who) if with_peer else value
            finally:
                conn.close()
        if not held:
            if self.reentered():
                raise IPCError(errno.EBUSY, "called from a signal handler that interrupted a push")
            if not self.enter(timeout):
                raise IPCTimeout(errno.ETIMEDOUT, "the connection stayed busy with a push")
        try:
            for attempt in (1, 2):
                fresh = self.conn is None
                try:
                    conn = self.connection(elect=elect, deadline=deadline if elect else end)
                    who = self.identity(conn, bounded(timeout, end)) if with_peer else ""
                    value = conn.call(method, *args, timeout=bounded(timeout, end))
                    return (value, who) if with_peer else value
                except (EOFError, OSError) as exc:
                    if isinstance(exc, Refused):
                        raise
                    self.drop_connection()
                    if fresh or attempt == 2 or isinstance(exc, TimeoutError):
                        raise
        finally:
            if self.retired:
                self.drop_connection()
            if not held:
                self.leave()
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- flushes ----
    def flush_call(self, deadline: float, *args: Any, wait: float | None = None,
                   strict: bool = False) -> tuple[Any, str] | None:
        """Ask the publisher to flush, waiting until ``deadline`` (the call bounded by it
        plus one ``ipc_timeout``, or by the deadline itself when ``strict``; ``wait``: how
        long the publisher waits, when not until the deadline), on the kept flush
        connection, or on one of its own while another thread's flush holds that; None
        when no publisher answers.
        Returns the answer and which publisher gave it (its instance id)."""
        ipc = self.config.ipc_timeout_s
        own = not self.flush_lock.acquire(blocking=False)
        try:
            if own or self.flush_conn is None or _peer_gone(self.flush_conn):
                if not own:
                    self._drop_flush_conn()  # its publisher has gone since an earlier flush
                try:
                    conn = self.channel.connect(bounded(ipc, deadline))
                except IPCError:
                    return None
                if not own and not self.retired:
                    self.flush_conn = conn
            else:
                conn = self.flush_conn
            try:
                who = self.identity(conn, bounded(ipc, deadline))
                if wait is None:
                    wait = max(deadline - time.monotonic(), 0.001)
                limit = bounded(wait + ipc, deadline) if strict else wait + ipc
                return conn.call("flush", wait, *args, timeout=limit), who
            except (EOFError, OSError):
                if conn is self.flush_conn:
                    self._drop_flush_conn()
                raise
            finally:
                if conn is not self.flush_conn:
                    conn.close()
        finally:
            if not own:
                if self.retired:
                    self._drop_flush_conn()
                self.flush_lock.release()

    def _drop_flush_conn(self) -> None:
        conn, self.flush_conn = self.flush_conn, None
        _close(conn)

    # ---- lifecycle ----
    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without a word on them."""
        conns = (self.conn, self.flush_conn)
        self.reset()
        for conn in conns:
            if conn is not None:
                conn.detach_after_fork()

    def close(self, wait: bool, timeout: float) -> None:
        """Close the connections at ``close()``, waiting up to ``timeout`` for a call still
        on one. One still in use is only shut down: that wakes its user with an error,
        and the user closes the descriptor itself, so its number is never reused under it."""
        self.retired = True
        if self.enter(timeout if wait else 0.0):
            try:
                self.drop_connection()
            finally:
                self.leave()
        else:
            _shut_down(self.conn)
        if self.flush_lock.acquire(blocking=False):
            try:
                self._drop_flush_conn()
            finally:
                self.flush_lock.release()
        else:
            _shut_down(self.flush_conn)


def _close(conn: Connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except OSError:
            pass


def _shut_down(conn: Connection | None) -> None:
    """Wake whoever waits on ``conn`` with an error, leaving its descriptor open."""
    if conn is None or conn.closed:
        return
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _peer_gone(conn: Connection) -> bool:
    """True when the peer closed ``conn`` (nothing is ever unread on a flush
    connection between calls), or it is unusable."""
    try:
        return bool(conn.poll(0))
    except (OSError, EOFError, ValueError):
        return True
