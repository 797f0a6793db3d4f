"""The publisher's side of the IPC: accepts workers on the channel's socket, a
thread per connection, and hands each well-formed request to the publisher
(docs/design.md, "IPC")."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .auth import HandshakeError, VersionMismatch, accept
from .connection import BadFrame, Connection, ProtocolViolation

__all__ = ["Server", "Handler"]

log = logging.getLogger("samsara_mp")

Handler = Callable[[str, tuple[Any, ...]], Any]

# After the handshake a worker may stay quiet for long; a request it has begun
# must come whole within this.
_REQUEST_TIMEOUT = 60.0
# One line per kind of trouble per this many seconds: a peer sending garbage in
# a loop must not fill the publisher's log.
_WARN_INTERVAL = 60.0
# accept() failures that pass (a peer gone before it was accepted) or that a
# pause may cure (out of descriptors or memory).
_ACCEPT_PASSING = {errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
_ACCEPT_SCARCE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class _Throttle:
    """Logs a warning at most once per interval for each kind, with how many it held back."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, kind: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval:
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        if held:
            msg += f" ({held} more like it not logged)"
        log.warning(msg, *args, exc_info=exc_info)


def _well_formed(message: Any) -> bool:
    return (isinstance(message, tuple) and len(message) == 2
            and isinstance(message[0], str) and isinstance(message[1], tuple))


def _shape(message: Any) -> str:
    if isinstance(message, tuple):
        names = [type(item).__name__ for item in message[:3]] + (["..."] if len(message) > 3 else [])
        return "(" + ", ".join(names) + ")"
    return type(message).__name__


class Server:
    """Accepts authenticated connections on a Unix socket; a thread per connection.

    ``handler(method, args)`` is called for each request on that connection's
    thread; its value is answered ``("ok", value)``, an exception it raises
    ``("error", text)``."""

    def __init__(
        self, path: str, authkey: bytes, handler: Handler, handshake_timeout: float = 5.0
    ) -> None:
        self.path = path
        self._authkey = authkey
        self._on_request = handler
        self._handshake_timeout = handshake_timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._sock.listen(128)
        # A peer gone between poll() and accept() must not leave accept() waiting for the next.
        self._sock.setblocking(False)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._throttle = _Throttle(_WARN_INTERVAL)
        self.clients = 0
        self.protocol_errors = 0  # requests refused for their shape, and unreadable frames

    def serve_forever(self) -> None:
        """Accept until :meth:`close`; returns then."""
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while not self._closed.is_set():
            try:
                # Woken each half second to see close(): closing a socket does not wake its poll().
                if not poller.poll(500):
                    continue
                client, _ = self._sock.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                if exc.errno in _ACCEPT_PASSING:
                    continue
                if exc.errno in _ACCEPT_SCARCE:
                    self._throttle.warn("accept", "samsara_mp publisher cannot accept a connection: %s", exc)
                    self._closed.wait(0.1)  # the pending connection keeps poll() ready
                    continue
                raise
            try:
                threading.Thread(
                    target=self._serve_client, args=(client,), name="samsara-mp-ipc", daemon=True
                ).start()
            except RuntimeError as exc:  # no thread can start now: that worker connects again
                client.close()
                self._throttle.warn("thread", "samsara_mp publisher cannot serve a connection: %s", exc)

    def _serve_client(self, client: socket.socket) -> None:
        conn = Connection(client, self._handshake_timeout)
        try:
            if not self._authenticate(conn):
                return
            with self._lock:
                self.clients += 1
            try:
                self._serve(conn)
            finally:
                with self._lock:
                    self.clients -= 1
        except Exception:  # noqa: BLE001 - only this connection ends; the server serves on
            self._throttle.warn("internal", "samsara_mp publisher dropped a connection on an error",
                                exc_info=True)
        finally:
            conn.close()

    def _authenticate(self, conn: Connection) -> bool:
        """The handshake, on the connection's own thread: one peer that stalls holds no other."""
        conn.handshake_deadline = time.monotonic() + self._handshake_timeout
        try:
            accept(conn, self._authkey)
        except VersionMismatch as exc:
            self._throttle.warn("version", "samsara_mp publisher refused a connection: %s", exc.strerror)
            return False
        except HandshakeError as exc:
            self._throttle.warn("handshake", "samsara_mp publisher refused a connection: %s", exc.strerror)
            return False
        except EOFError:
            self._throttle.warn("handshake", "samsara_mp publisher refused a connection: "
                                "the client hung up during the handshake")
            return False
        except OSError as exc:
            self._throttle.warn("handshake", "samsara_mp publisher refused a connection: %s", exc)
            return False
        conn.handshake_deadline = None
        return True

    def _serve(self, conn: Connection) -> None:
        """Answer the requests on ``conn`` until it ends or the server closes."""
        while not self._closed.is_set():
            try:
                if not conn.poll(1.0):
                    continue
                conn.timeout = _REQUEST_TIMEOUT
                message = conn.recv()
            except BadFrame as exc:
                self._count_violation()
                if conn.broken is not None:  # no way back into step: hang up
                    self._throttle.warn("unreadable", "samsara_mp publisher hung up on a client: %s",
                                        exc.strerror)
                    return
                self._throttle.warn("undecodable", "samsara_mp publisher refused a request: %s",
                                    exc.strerror)
                answer: tuple[str, Any] = ("error", f"BadFrame: {exc.strerror}")
            except (EOFError, OSError):
                return
            else:
                if _well_formed(message):
                    try:
                        answer = self._answer(*message)
                    except ProtocolViolation as exc:
                        # Answered, counted, hung up on; the ring and the counters are untouched.
                        self._count_violation()
                        self._throttle.warn("request", "samsara_mp publisher refused a request: %s", exc)
                        self._reply(conn, ("error", f"ProtocolViolation: {exc}"))
                        return
                else:
                    self._count_violation()
                    self._throttle.warn("shape", "samsara_mp publisher refused a request: "
                                        "not a (method, args) tuple but %s", _shape(message))
                    answer = ("error", "BadFrame: a request is a (method, args) tuple")
            if not self._reply(conn, answer):
                return

    def _count_violation(self) -> None:
        with self._lock:
            self.protocol_errors += 1

    def _reply(self, conn: Connection, answer: tuple[str, Any]) -> bool:
        """Send ``answer``, bounded like a handshake; False when the connection is done."""
        try:
            body = pickle.dumps(answer, protocol=5)
        except Exception as exc:  # noqa: BLE001 - the handler's value does not pickle
            body = pickle.dumps(("error", f"the answer does not pickle: {type(exc).__name__}: {exc}"),
                                protocol=5)
        conn.timeout = self._handshake_timeout
        try:
            conn.send_bytes(body)
        except OSError:
            return False
        return True

    def _answer(self, method: str, args: tuple[Any, ...]) -> tuple[str, Any]:
        try:
            return ("ok", self._on_request(method, args))
        except ProtocolViolation:
            raise
        except Exception as exc:  # noqa: BLE001 - the peer gets the error text
            log.debug("ipc handler error for %s", method, exc_info=True)
            return ("error", f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Stop accepting and remove the socket file. A connection's thread ends
        after the request it is serving has been answered."""
        self._closed.set()
        try:
            self._sock.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
