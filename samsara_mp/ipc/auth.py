"""The IPC handshake: each side proves it holds the channel's authkey, and both
speak the same protocol version, before any message is unpickled; without
OpenSSL's HMAC, which a worker's exit hook may find torn down (docs/design.md)."""

from __future__ import annotations

import errno
import hmac
import os
import socket
import struct
import time

# hashlib is imported with this module, never first in a handshake: importing
# it loads OpenSSL's _hashlib, which crashes once OpenSSL's cleanup has run.
from hashlib import blake2b

from ..errors import ChannelError
from .connection import SNDBUF, Connection, IPCError

__all__ = ["PROTOCOL_VERSION", "HandshakeError", "VersionMismatch", "connect", "accept"]

# One integer, equal on both sides or refused. Bumped for any change a peer of
# the previous version would misread: the frames, the handshake after the hello,
# the shape or meaning of a request or answer. A new request needs none (an
# older publisher answers it with an error). Every version must keep the frame
# header and the hello's first bytes (_HELLO, then the version) as they are,
# so that two versions can always name each other.
PROTOCOL_VERSION = 1

_HELLO = b"#SMP-IPC#"
_VERSION = struct.Struct("!H")
_WELCOME = b"#SMP-WELCOME#"
_FAILURE = b"#SMP-FAILURE#"
_NONCE_BYTES = 32
_MAC_BYTES = 32
_LIMIT = 256  # what a peer not yet authenticated can make us allocate
# Who answers: a client's answer never serves as the publisher's, and back.
CLIENT = b"smp-ipc-client"
SERVER = b"smp-ipc-server"


class HandshakeError(IPCError):
    """The peer did not prove it holds the authkey, or is not a samsara_mp peer."""


class VersionMismatch(HandshakeError, ChannelError):
    """The peer speaks another version of the IPC protocol (a publisher started by
    another release of samsara_mp serves the channel)."""


def mac(authkey: bytes, nonce: bytes, answerer: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    """``answerer``'s answer to ``nonce``: BLAKE2b keyed with the authkey (at most
    64 bytes), personalised per direction (a challenge cannot be reflected), and
    bound to the protocol version.

    hashlib's blake2b is CPython's built-in BLAKE2 in every release this package
    supports, never OpenSSL's: hashlib.py lists it in ``__block_openssl_constructor``
    (OpenSSL's has no key or person). So it works after OpenSSL's cleanup."""
    return blake2b(_VERSION.pack(version) + nonce, key=authkey, digest_size=_MAC_BYTES,
                   person=answerer).digest()


def _same(a: bytes | bytearray, b: bytes) -> bool:
    # hmac.compare_digest is _hashlib's, which calls OpenSSL's CRYPTO_memcmp: a
    # plain loop with no state that OpenSSL's cleanup frees (tests/test_ipc.py
    # runs a handshake after that cleanup).
    return hmac.compare_digest(bytes(a), b)


def _hello(frame: bytes | bytearray, payload: int, peer: str, ours: str) -> bytes:
    """The payload of a hello; VersionMismatch naming both versions."""
    head = len(_HELLO) + _VERSION.size
    if len(frame) < head or not frame.startswith(_HELLO):
        raise HandshakeError(errno.EPROTO, f"the {peer} did not send a samsara_mp IPC hello")
    (version,) = _VERSION.unpack_from(frame, len(_HELLO))
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            errno.EPROTO,
            f"the {peer} speaks samsara_mp IPC protocol version {version}, "
            f"{ours} version {PROTOCOL_VERSION}",
        )
    if len(frame) != head + payload:
        raise HandshakeError(errno.EPROTO, f"the {peer}'s hello is malformed")
    return bytes(frame[head:])


def accept(conn: Connection, authkey: bytes) -> None:
    """The publisher's side: challenge the client, check its answer and its
    version, then answer its challenge. HandshakeError when it is refused."""
    nonce = os.urandom(_NONCE_BYTES)
    conn.send_bytes(_HELLO + _VERSION.pack(PROTOCOL_VERSION) + nonce)
    frame = conn.recv_bytes(_LIMIT)
    payload = _hello(frame, _MAC_BYTES + _NONCE_BYTES, "client", "this publisher")
    answer, theirs = payload[:_MAC_BYTES], payload[_MAC_BYTES:]
    if not _same(answer, mac(authkey, nonce, CLIENT)):
        conn.send_bytes(_FAILURE)
        raise HandshakeError(errno.EACCES, "the client's answer to the challenge was wrong")
    conn.send_bytes(_WELCOME + mac(authkey, theirs, SERVER))


def _answer(conn: Connection, authkey: bytes) -> None:
    """The client's side: answer the publisher's challenge, challenge it, check its answer."""
    frame = conn.recv_bytes(_LIMIT)
    try:
        nonce = _hello(frame, _NONCE_BYTES, "publisher", "this client")
    except VersionMismatch:
        # Our hello alone, so that the publisher can log both versions too.
        conn.send_bytes(_HELLO + _VERSION.pack(PROTOCOL_VERSION))
        raise
    ours = os.urandom(_NONCE_BYTES)
    conn.send_bytes(_HELLO + _VERSION.pack(PROTOCOL_VERSION) + mac(authkey, nonce, CLIENT) + ours)
    verdict = conn.recv_bytes(_LIMIT)
    if verdict == _FAILURE:
        raise HandshakeError(errno.EACCES, "the publisher refused our answer (another authkey)")
    if not verdict.startswith(_WELCOME) or not _same(verdict[len(_WELCOME):], mac(authkey, ours, SERVER)):
        raise HandshakeError(errno.EACCES, "the publisher's answer to our challenge was wrong")


def connect(path: str, authkey: bytes, timeout: float) -> Connection:
    """Connect and authenticate to a publisher's socket, all within ``timeout``."""
    start = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    except OSError:
        pass  # the kernel's cap applies; pushes are split by size as well
    try:
        # A full listen backlog makes connect() wait.
        sock.settimeout(timeout)
        sock.connect(path)
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError as exc:
        sock.close()
        raise IPCError(exc.errno or errno.ECONNREFUSED, f"cannot connect to {path}: {exc}") from exc
    conn = Connection(sock, timeout)
    conn.sndbuf = sndbuf
    conn.handshake_deadline = start + timeout
    try:
        _answer(conn, authkey)
    except HandshakeError as exc:
        conn.close()
        # Its own class, so that VersionMismatch stays a ChannelError.
        raise type(exc)(exc.errno, f"handshake with {path} failed: {exc.strerror}") from None
    except (EOFError, OSError) as exc:
        conn.close()
        if isinstance(exc, IPCError):
            raise
        why = "the publisher hung up" if isinstance(exc, EOFError) else str(exc)
        raise IPCError(errno.EACCES, f"handshake with {path} failed: {why}") from exc
    conn.handshake_deadline = None
    return conn
