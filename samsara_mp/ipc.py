"""IPC between workers and the publisher, with a deadline on every wait.

Built on ``multiprocessing.connection`` (the transport under
``multiprocessing.managers``: Unix socket, authkey challenge, pickled
messages). The manager's proxies cannot bound a call: a publisher that is
SIGSTOPped or deadlocked would hang a worker's shipper for ever. Here every
send and receive, the handshake included, runs on a non-blocking socket
under a deadline, and the server does each handshake on the connection's own
thread, so one stuck peer cannot stall the others.

The handshake is ``multiprocessing``'s mutual challenge and response, with a
keyed BLAKE2b MAC from CPython's built-in ``_blake2`` module instead of an HMAC
from OpenSSL, personalised per direction (a challenge cannot be reflected). A
worker may make its first connection from an exit hook that runs after
OpenSSL's own ``atexit`` cleanup (an idle uWSGI worker told to reload calls
``exit()`` from its signal handler, and C exit handlers run newest first): an
OpenSSL HMAC there crashed the worker and lost what it had staged. A client
still answers an older samsara_mp publisher's ``multiprocessing`` challenge, so
workers of a new release can use a publisher started by an old one until it
is replaced; only that path uses OpenSSL.

Messages are tuples ``(method, args)``; answers are ``("ok", value)`` or
``("error", "message")``. The authkey file is the trust boundary: anyone who
can read it can make the publisher unpickle what they send.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection
from typing import Any

from ._procfs import process_start

try:  # CPython's own BLAKE2, never OpenSSL's: see _mac()
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - an interpreter without the _blake2 module
    from hashlib import blake2b

__all__ = ["IPCError", "IPCTimeout", "TimedConnection", "connect", "Server", "answer_challenge",
           "deliver_challenge"]

log = logging.getLogger("samsara_mp")

_SNDBUF = 4 * 1024 * 1024


class IPCError(OSError):
    """The publisher could not be reached or answered with an error."""


class IPCTimeout(IPCError, TimeoutError):
    """The publisher did not answer within the IPC timeout."""


class Refused(IPCError):
    """The publisher answered the request with an error: it did not carry it out
    (a push it refuses, shutting down say, is not in its buffer)."""


class TimedConnection(Connection):
    """A ``Connection`` whose every read and write gives up after ``timeout`` seconds."""

    timeout: float = 5.0
    sndbuf: int = 212_992

    def __init__(self, handle: int, timeout: float) -> None:
        os.set_blocking(handle, False)
        super().__init__(handle)
        self.timeout = timeout
        self._peer: tuple[int, int | None] | None | bool = False  # not read yet
        # Which publisher start this is (its random instance id, from its answers);
        # None: not known yet; "": an older publisher, which sends none.
        self.instance: str | None = None

    def peer(self) -> tuple[int, int | None] | None:
        """The process that listens at the other end, as (pid, start time in clock
        ticks), read once: Linux's SO_PEERCRED, and /proc for the start time, so a
        reused pid is not taken for it. None where the system names no peer (the
        publisher is in a pid namespace this process cannot see)."""
        if self._peer is False:
            self._peer = None
            try:
                fd = os.dup(self.fileno())
                try:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
                except OSError:
                    os.close(fd)
                    raise
                try:
                    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                finally:
                    sock.close()
                pid = struct.unpack("3i", creds)[0]
                if pid:
                    self._peer = (pid, process_start(pid))
            except (OSError, AttributeError, ValueError, struct.error):
                pass
        return self._peer if isinstance(self._peer, tuple) else None

    # During a handshake: one deadline for all its reads and writes (else a peer
    # that answers each piece just in time holds us several timeouts).
    handshake_deadline: float | None = None

    def _deadline(self) -> float:
        deadline = time.monotonic() + self.timeout
        if self.handshake_deadline is not None:
            return min(deadline, self.handshake_deadline)
        return deadline

    def _live_handle(self) -> int:
        handle: int | None = self._handle  # type: ignore[attr-defined]
        if handle is None:
            raise OSError(errno.EBADF, "connection closed")
        return handle

    def _wait(self, handle: int, for_write: bool, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise IPCTimeout(errno.ETIMEDOUT, "no answer in time")
        if for_write:
            ready = select.select([], [handle], [], remaining)[1]
        else:
            ready = select.select([handle], [], [], remaining)[0]
        if not ready:
            raise IPCTimeout(errno.ETIMEDOUT, "no answer in time")

    def _send(self, buf: Any, write: Callable[[int, Any], int] = os.write) -> None:
        deadline = self._deadline()
        view = memoryview(buf)
        while view:
            handle = self._live_handle()  # read again: another thread may have closed it
            try:
                n = write(handle, view)
            except BlockingIOError:
                self._wait(handle, True, deadline)
                continue
            view = view[n:]

    def _recv(self, size: int, read: Callable[[int, int], bytes] = os.read) -> Any:
        import io

        deadline = self._deadline()
        buf = io.BytesIO()
        remaining = size
        while remaining > 0:
            handle = self._live_handle()
            try:
                chunk = read(handle, remaining)
            except BlockingIOError:
                self._wait(handle, False, deadline)
                continue
            if not chunk:
                if remaining == size:
                    raise EOFError
                raise OSError("got end of file during message")
            buf.write(chunk)
            remaining -= len(chunk)
        return buf

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Send one request and wait for its answer, bounded by the timeout."""
        saved = self.timeout
        if timeout is not None:
            self.timeout = timeout
        try:
            self.send((method, args))
            kind, value = self.recv()
        finally:
            self.timeout = saved
        if kind != "ok":
            raise Refused(errno.EPROTO, f"publisher refused {method}: {value}")
        return value


_CHALLENGE = b"#SMP-CHALLENGE#"
_WELCOME = b"#SMP-WELCOME#"
_FAILURE = b"#SMP-FAILURE#"
_NONCE_BYTES = 32
_MAC_BYTES = 32
# Who answers: a client's answer never serves as the publisher's, and back.
CLIENT = b"smp-ipc-client"
SERVER = b"smp-ipc-server"
# An older samsara_mp publisher speaks multiprocessing's own handshake.
_LEGACY_CHALLENGE = b"#CHALLENGE#"
_LEGACY_WELCOME = b"#WELCOME#"


def _mac(authkey: bytes, nonce: bytes, answerer: bytes) -> bytes:
    """``answerer``'s answer to ``nonce``: BLAKE2b keyed with the authkey (at most 64 bytes)."""
    return blake2b(nonce, key=authkey, digest_size=_MAC_BYTES, person=answerer).digest()


def _same(a: bytes, b: bytes) -> bool:
    """Compare in time independent of where they differ (without OpenSSL's compare)."""
    if len(a) != len(b):
        return False
    diff = 0
    for x, y in zip(a, b, strict=True):
        diff |= x ^ y
    return diff == 0


def deliver_challenge(conn: Connection, authkey: bytes, answerer: bytes) -> None:
    """Challenge the peer (``answerer``: CLIENT or SERVER) to prove it holds ``authkey``;
    AuthenticationError when it does not."""
    nonce = os.urandom(_NONCE_BYTES)
    conn.send_bytes(_CHALLENGE + nonce)
    response = conn.recv_bytes(256)  # refuses a longer message
    if _same(response, _mac(authkey, nonce, answerer)):
        conn.send_bytes(_WELCOME)
    else:
        conn.send_bytes(_FAILURE)
        raise AuthenticationError("digest received was wrong")


def answer_challenge(conn: Connection, authkey: bytes, answerer: bytes) -> bool:
    """Prove to the peer that we (``answerer``) hold ``authkey``; AuthenticationError
    when it refuses. False when the peer is an older samsara_mp publisher, which
    asked with ``multiprocessing``'s challenge (answered, and then challenged, its way)."""
    message = conn.recv_bytes(256)
    if message.startswith(_LEGACY_CHALLENGE) and answerer == CLIENT:
        try:
            _answer_legacy(conn, authkey, message[len(_LEGACY_CHALLENGE):])
        except (EOFError, OSError):
            raise
        except Exception:  # noqa: BLE001 - multiprocessing's texts can quote the peer's bytes
            raise AuthenticationError("the handshake with an older samsara_mp publisher failed") from None
        return False
    if not message.startswith(_CHALLENGE) or len(message) != len(_CHALLENGE) + _NONCE_BYTES:
        raise AuthenticationError("the peer's challenge is not samsara_mp's")
    conn.send_bytes(_mac(authkey, message[len(_CHALLENGE):], answerer))
    if conn.recv_bytes(256) != _WELCOME:
        raise AuthenticationError("digest sent was rejected")
    return True


def _answer_legacy(conn: Connection, authkey: bytes, message: bytes) -> None:
    """Answer an older publisher's challenge as ``multiprocessing.connection`` does
    (3.12+: ``{digest}`` prefixed, else an HMAC-MD5), then challenge it its way."""
    from multiprocessing import connection as mpc  # OpenSSL: only for an older publisher

    create = getattr(mpc, "_create_response", None)  # 3.12+
    if create is not None:
        response = create(authkey, message)
    else:  # Python 3.11's multiprocessing: an HMAC-MD5 of the challenge
        import hmac

        response = hmac.new(authkey, message, "md5").digest()
    conn.send_bytes(response)
    if conn.recv_bytes(256) != _LEGACY_WELCOME:
        raise AuthenticationError("digest sent was rejected")
    mpc.deliver_challenge(conn, authkey)


def connect(path: str, authkey: bytes, timeout: float) -> TimedConnection:
    """Connect and authenticate to a publisher's socket, all within ``timeout``."""
    start = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # A push should leave in one write(): each further write must win the
        # GIL back from the recording thread, up to a switch interval each.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
    except OSError:
        pass  # the kernel's cap applies; pushes are split by size as well
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise IPCError(exc.errno or errno.ECONNREFUSED, f"cannot connect to {path}: {exc}") from exc
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    conn = TimedConnection(sock.detach(), timeout)
    conn.sndbuf = sndbuf
    conn.handshake_deadline = start + timeout
    try:
        if answer_challenge(conn, authkey, CLIENT):
            deliver_challenge(conn, authkey, SERVER)
    except (AuthenticationError, EOFError, OSError) as exc:
        conn.close()
        if isinstance(exc, IPCError):
            raise
        raise IPCError(errno.EACCES, f"handshake with {path} failed: {exc}") from exc
    conn.handshake_deadline = None
    return conn


Handler = Callable[[str, tuple[Any, ...]], Any]


class Server:
    """Accepts authenticated connections on a Unix socket; a thread per connection."""

    def __init__(
        self, path: str, authkey: bytes, handler: Handler, handshake_timeout: float = 5.0
    ) -> None:
        self.path = path
        self._authkey = authkey
        self._handler = handler
        self._handshake_timeout = handshake_timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._sock.listen(128)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[TimedConnection] = set()
        self.clients = 0

    def serve_forever(self) -> None:
        """Accept until :meth:`close`; returns then."""
        while not self._closed.is_set():
            try:
                ready = select.select([self._sock], [], [], 0.5)[0]
                if not ready:
                    continue
                client, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                raise
            threading.Thread(
                target=self._serve_client, args=(client,), name="samsara-mp-ipc", daemon=True
            ).start()

    def _serve_client(self, client: socket.socket) -> None:
        client.setblocking(True)
        conn = TimedConnection(client.detach(), self._handshake_timeout)
        conn.handshake_deadline = time.monotonic() + self._handshake_timeout
        try:
            deliver_challenge(conn, self._authkey, CLIENT)
            answer_challenge(conn, self._authkey, SERVER)
            conn.handshake_deadline = None
        except (AuthenticationError, EOFError, OSError) as exc:
            log.warning("samsara_mp publisher refused a connection: %s", exc)
            conn.close()
            return
        # After the handshake the peer may stay quiet for long; only replies are bounded.
        conn.timeout = 60.0
        with self._lock:
            self._conns.add(conn)
            self.clients += 1
        try:
            while not self._closed.is_set():
                try:
                    if not conn.poll(1.0):
                        continue
                    method, args = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    answer = ("ok", self._handler(method, args))
                except Exception as exc:  # noqa: BLE001 - the peer gets the error text
                    log.debug("ipc handler error for %s", method, exc_info=True)
                    answer = ("error", f"{type(exc).__name__}: {exc}")
                try:
                    conn.timeout = self._handshake_timeout
                    conn.send(answer)
                except OSError:
                    return
        finally:
            with self._lock:
                self._conns.discard(conn)
                self.clients -= 1
            conn.close()

    def close(self) -> None:
        """Stop accepting and remove the socket file."""
        self._closed.set()
        try:
            self._sock.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
