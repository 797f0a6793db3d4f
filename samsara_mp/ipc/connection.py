"""One IPC connection: length-prefixed frames on a Unix socket, every send and
receive bounded by a deadline, so that a stopped or deadlocked publisher never
holds a worker (docs/design.md, "IPC")."""

from __future__ import annotations

import errno
import math
import os
import pickle
import select
import socket
import struct
import time
from typing import Any

from .._procfs import process_start

__all__ = ["IPCError", "IPCTimeout", "Refused", "BadFrame", "Connection", "HEADER", "MAX_FRAME"]

HEADER = struct.Struct("!I")
# Far above any push (at most ``staging_bytes``, 8 MiB by default), far below
# what a length read off a stream out of step would mostly claim.
MAX_FRAME = 1 << 30
# Larger bodies are allocated as their bytes arrive: a length that lies costs
# only what was sent.
_PREALLOC = 64 << 20
# A push should leave in one write(): each further write must win the GIL back
# from the recording thread, up to a switch interval each.
SNDBUF = 4 * 1024 * 1024
# A peer gone mid-write is an error to handle here, never a SIGPIPE, whatever
# the process (an application server embedding Python) did with that signal.
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


class IPCError(OSError):
    """The publisher could not be reached or answered with an error."""


class IPCTimeout(IPCError, TimeoutError):
    """The publisher did not answer within the IPC timeout."""


class Refused(IPCError):
    """The publisher answered the request with an error: it did not carry it out
    (a push it refuses, shutting down say, is not in its buffer)."""


class BadFrame(IPCError):
    """A frame too long, or whose body does not unpickle. ``Connection.broken``
    says whether the stream is still in step (the frame was read whole)."""


class ProtocolViolation(TypeError):
    """A request of the right frame but the wrong shape or types (a handler raises it):
    the peer is answered with an error and hung up on, and nothing else changes."""


class Connection:
    """A connected stream socket whose every read and write gives up after ``timeout`` seconds.

    A frame is its body's length (``HEADER``), then the body: raw bytes in the
    handshake, a pickle (protocol 5) of a message after it.

    Not thread-safe: one user at a time, as a worker's shipper takes its lock
    around each call. Another thread may :meth:`close` it, or shut the socket
    down, to wake that user with an error.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        # Non-blocking for good: a read or write that would block waits in poll(),
        # under the deadline, and a socket timeout set by anyone else cannot apply.
        sock.setblocking(False)
        self._sock = sock
        self.timeout = timeout
        self.sndbuf = 212_992
        # Which publisher start this is (its random instance id, from its answers);
        # None: not known yet.
        self.instance: str | None = None
        # During a handshake: one deadline for all its reads and writes (else a peer
        # that answers each piece just in time holds us several timeouts).
        self.handshake_deadline: float | None = None
        self._peer: tuple[int, int | None] | None | bool = False  # not read yet
        self._broken: str | None = None
        self._closed = False

    # ---- state ----
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def broken(self) -> str | None:
        """Why the stream is out of step (a frame half written or half read, an
        answer still owed), or None. A broken connection refuses every send and
        receive: its user must close it and connect again."""
        return self._broken

    def fileno(self) -> int:
        if self._closed:
            raise OSError(errno.EBADF, "connection closed")
        return self._sock.fileno()

    def close(self) -> None:
        """Close the descriptor (without a shutdown: a forked child's copy of the
        socket must not end its parent's connection)."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    def detach_after_fork(self) -> None:
        """In a forked child: close this process's copy of the descriptor, once.

        The parent's connection is left as it was (no shutdown, nothing sent),
        and a later :meth:`close` does nothing, so it cannot close whatever file
        has since been given the same number."""
        if self._closed:
            return
        self._closed = True
        fd = self._sock.detach()
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def _break(self, why: str) -> None:
        if self._broken is None:
            self._broken = why

    def _live(self) -> socket.socket:
        # Read before every attempt: another thread may have closed the connection.
        if self._closed:
            raise OSError(errno.EBADF, "connection closed")
        if self._broken is not None:
            raise IPCError(errno.EPIPE, f"connection unusable: {self._broken}")
        return self._sock

    # ---- the peer ----
    def peer(self) -> tuple[int, int | None] | None:
        """The process that listens at the other end, as (pid, start time in clock
        ticks), read once: Linux's SO_PEERCRED, and /proc for the start time, so a
        reused pid is not taken for it. None where the system names no peer (the
        publisher is in a pid namespace this process cannot see)."""
        if self._peer is False:
            self._peer = None
            try:
                creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                pid = struct.unpack("3i", creds)[0]
                if pid:
                    self._peer = (pid, process_start(pid))
            except (OSError, AttributeError, ValueError, struct.error):
                pass
        return self._peer if isinstance(self._peer, tuple) else None

    # ---- waiting ----
    def _deadline(self) -> float:
        deadline = time.monotonic() + self.timeout
        if self.handshake_deadline is not None:
            return min(deadline, self.handshake_deadline)
        return deadline

    def _wait(self, sock: socket.socket, event: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise IPCTimeout(errno.ETIMEDOUT, "no answer in time")
        # poll(), not select(): a process with many files open gives sockets
        # numbers past select()'s limit of 1024.
        poller = select.poll()
        poller.register(_fd(sock), event)
        if not poller.poll(math.ceil(remaining * 1000)):
            raise IPCTimeout(errno.ETIMEDOUT, "no answer in time")

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True when a receive would not wait: a frame (or part of one) has come,
        or the peer hung up, or the stream is broken (the receive then raises)."""
        if self._closed:
            raise OSError(errno.EBADF, "connection closed")
        if self._broken is not None:
            return True
        poller = select.poll()
        poller.register(_fd(self._sock), select.POLLIN)
        ms = None if timeout is None else max(math.ceil(timeout * 1000), 0)
        return bool(poller.poll(ms))

    # ---- frames ----
    def send_bytes(self, body: bytes | bytearray | memoryview) -> None:
        """Send one frame carrying ``body`` as it is."""
        size = memoryview(body).nbytes
        if size > MAX_FRAME:
            raise IPCError(errno.EMSGSIZE, f"a message of {size} bytes is over the {MAX_FRAME} bytes limit")
        deadline = self._deadline()
        # Header and body in one sendmsg(): a push leaves in one system call.
        parts = [memoryview(HEADER.pack(size))]
        if size:
            parts.append(memoryview(body).cast("B"))
        started = False
        try:
            while parts:
                sock = self._live()
                try:
                    n = sock.sendmsg(parts, (), _NOSIGNAL)
                except BlockingIOError:
                    self._wait(sock, select.POLLOUT, deadline)
                    continue
                started = True
                while parts and n >= len(parts[0]):
                    n -= len(parts.pop(0))
                if n:
                    parts[0] = parts[0][n:]
        except BaseException as exc:
            # A part of a frame has gone: whatever is sent next would be read as its rest.
            if started:
                self._break(f"a message was cut short: {exc!r}")
            raise

    def recv_bytes(self, limit: int = MAX_FRAME) -> bytearray:
        """Receive one frame's body; ``BadFrame`` (and the stream broken) for one
        longer than ``limit``, ``EOFError`` when the peer hung up between frames."""
        deadline = self._deadline()
        started = False
        try:
            header = bytearray(HEADER.size)
            got = 0
            while got < HEADER.size:
                got += self._recv_into(memoryview(header)[got:], deadline, started)
                started = True
            (size,) = HEADER.unpack(header)
            if size > limit:
                raise BadFrame(errno.EMSGSIZE, f"a frame of {size} bytes is over the {limit} bytes limit")
            body = bytearray(min(size, _PREALLOC))
            got = 0
            while got < size:
                if got == len(body):
                    body.extend(bytes(min(size - got, len(body))))
                with memoryview(body)[got:] as view:
                    got += self._recv_into(view, deadline, True)
            return body
        except BaseException as exc:
            if started:
                self._break(f"a message was cut short: {exc!r}")
            raise

    def _recv_into(self, view: memoryview, deadline: float, started: bool) -> int:
        while True:
            sock = self._live()
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                self._wait(sock, select.POLLIN, deadline)
                continue
            if n:
                return n
            if not started:
                raise EOFError
            raise OSError(errno.ECONNRESET, "got end of file during message")

    # ---- messages ----
    def send(self, obj: Any) -> None:
        """Send one message (pickled: an object that does not pickle raises before
        anything is sent)."""
        self.send_bytes(pickle.dumps(obj, protocol=5))

    def recv(self) -> Any:
        """Receive one message; ``BadFrame`` for one that does not unpickle (the
        stream stays in step)."""
        body = self.recv_bytes()
        try:
            return pickle.loads(body)
        except Exception as exc:  # noqa: BLE001 - unpickling raises about anything
            raise BadFrame(errno.EPROTO, f"a message that does not unpickle ({type(exc).__name__})") from None

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Send one request and wait for its answer, bounded by the timeout."""
        saved = self.timeout
        if timeout is not None:
            self.timeout = timeout
        try:
            self.send((method, args))
            try:
                answer = self.recv()
            except BaseException as exc:
                # The answer is still owed: the next call would read it as its own.
                self._break(f"no answer to {method}: {exc!r}")
                raise
        finally:
            self.timeout = saved
        if not (isinstance(answer, tuple) and len(answer) == 2):
            self._break(f"a malformed answer to {method}")
            raise IPCError(errno.EPROTO, f"publisher answered {method} with a malformed message")
        kind, value = answer
        if kind != "ok":
            raise Refused(errno.EPROTO, f"publisher refused {method}: {value}")
        return value


def _fd(sock: socket.socket) -> int:
    fd = sock.fileno()
    if fd < 0:  # closed by another thread since it was checked
        raise OSError(errno.EBADF, "connection closed")
    return fd
