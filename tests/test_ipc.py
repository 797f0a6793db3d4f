"""The IPC: the handshake (mutual proof of the authkey, one protocol version, no
OpenSSL HMAC on the way), framing under deadlines, and a server that outlives
whatever an authenticated peer sends.

A uWSGI worker may make its first connection from its exit hook, which runs
after OpenSSL's atexit cleanup; ``test_uwsgi.py`` shows the crash end to end.
"""

from __future__ import annotations

import gc
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from samsara_mp._procfs import process_start
from samsara_mp.errors import ChannelError
from samsara_mp.ipc import (
    PROTOCOL_VERSION,
    Connection,
    IPCError,
    IPCTimeout,
    Refused,
    Server,
    VersionMismatch,
    connect,
)
from samsara_mp.ipc.auth import CLIENT, SERVER, mac
from samsara_mp.ipc.connection import HEADER, MAX_FRAME

KEY = bytes(range(32))
HELLO = b"#SMP-IPC#"


def _version(v: int) -> bytes:
    return v.to_bytes(2, "big")


def _handler(method: str, args: tuple[Any, ...]) -> Any:
    if method == "fail":
        raise ValueError("as asked")
    if method == "unpicklable":
        return threading.Lock()
    return (method, args)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    path = str(tmp_path / "s.sock")
    server = Server(path, KEY, _handler, handshake_timeout=2.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, path
    finally:
        server.close()
        thread.join(5)
        assert not thread.is_alive()


def _raw(path: str, timeout: float = 2.0) -> Connection:
    """A connection to ``path`` that has not done any handshake."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return Connection(sock, timeout)


def test_the_right_key_connects_and_calls(served: tuple[Server, str]) -> None:
    _, path = served
    conn = connect(path, KEY, 5.0)
    try:
        assert conn.call("echo", 1, "two", timeout=2.0) == ("echo", (1, "two"))
        assert conn.sndbuf > 0 and conn.peer() == (os.getpid(), process_start(os.getpid()))
        payload = os.urandom(6 * 1024 * 1024)  # many reads and writes each way
        assert conn.call("push", payload, timeout=5.0) == ("push", (payload,))
        with pytest.raises(Refused, match="ValueError: as asked"):
            conn.call("fail")
        with pytest.raises(Refused, match="does not pickle"):
            conn.call("unpicklable")
        assert conn.call("ping") == ("ping", ())  # and it serves on
    finally:
        conn.close()


def test_a_wrong_key_is_refused_and_the_server_serves_on(
    served: tuple[Server, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, path = served
    with pytest.raises(IPCError, match="handshake .* failed"):
        connect(path, bytes(32), 2.0)
    wait_until(lambda: "refused a connection" in caplog.text, 5, "the refusal to be logged")
    conn = connect(path, KEY, 2.0)
    try:
        assert conn.call("ping", timeout=2.0)[0] == "ping"
        assert server.clients == 1
    finally:
        conn.close()


@pytest.mark.parametrize(("answer", "verdict"), [
    (b"", None),
    (HELLO + _version(PROTOCOL_VERSION) + b"x" * 64, b"#SMP-FAILURE#"),
    (HELLO + _version(PROTOCOL_VERSION) + b"y" * 300, None),
], ids=["empty", "wrong", "oversized"])
def test_a_bad_answer_to_the_challenge_is_refused(
    served: tuple[Server, str], answer: bytes, verdict: bytes | None
) -> None:
    _, path = served
    conn = _raw(path)
    try:
        hello = conn.recv_bytes(256)
        assert hello.startswith(HELLO + _version(PROTOCOL_VERSION)) and len(hello) == len(HELLO) + 2 + 32
        conn.send_bytes(answer)
        if verdict is not None:
            assert conn.recv_bytes(256) == verdict
        with pytest.raises((EOFError, OSError)):
            conn.recv_bytes(256)  # and the server hangs up
    finally:
        conn.close()


@pytest.mark.parametrize(("answerer", "welcomed"), [(CLIENT, True), (SERVER, False)],
                         ids=["as-a-client", "as-the-server"])
def test_each_direction_has_its_own_answer(
    served: tuple[Server, str], answerer: bytes, welcomed: bool
) -> None:
    # A fake publisher that relays a client's challenge to the real one must not get
    # back an answer it could pass off as its own: the publisher's answers differ.
    _, path = served
    conn = _raw(path)
    try:
        nonce = bytes(conn.recv_bytes(256)[len(HELLO) + 2:])
        ours = os.urandom(32)
        conn.send_bytes(HELLO + _version(PROTOCOL_VERSION) + mac(KEY, nonce, answerer) + ours)
        verdict = conn.recv_bytes(256)
        if welcomed:
            assert verdict == b"#SMP-WELCOME#" + mac(KEY, ours, SERVER)
        else:
            assert verdict == b"#SMP-FAILURE#"
    finally:
        conn.close()


_AFTER_OPENSSL_CLEANUP = textwrap.dedent(r"""
    import ctypes, hashlib, sys, threading, _blake2
    from samsara_mp.ipc import Server, connect
    # The premise: hashlib's blake2b is CPython's own, not OpenSSL's.
    assert hashlib.blake2b is _blake2.blake2b
    hashlib.sha256(b"a worker's session token").digest()  # OpenSSL in use, as in a web worker
    maps = open("/proc/self/maps").read().splitlines()
    libcrypto = sorted({line.split()[-1] for line in maps if "libcrypto" in line})
    if not libcrypto:
        print("no libcrypto")
        sys.exit(0)
    ctypes.CDLL(libcrypto[0]).OPENSSL_cleanup()  # what the C exit handlers do first
    path, key = sys.argv[1], bytes(range(32))
    server = Server(path, key, lambda method, args: method)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    conn = connect(path, key, 5.0)
    assert conn.call("ping", timeout=5.0) == "ping"
    conn.close()
    server.close()
    thread.join(5)
    print("ok")
""")


def test_a_handshake_works_after_openssl_cleanup(tmp_path: Path) -> None:
    # multiprocessing's handshake (an HMAC from OpenSSL) segfaults here.
    out = subprocess.run(
        [sys.executable, "-c", _AFTER_OPENSSL_CLEANUP, str(tmp_path / "s.sock")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=_root()),
    )
    assert out.returncode == 0, (out.returncode, out.stderr)
    if out.stdout.strip() == "no libcrypto":
        pytest.skip("this interpreter does not load OpenSSL")
    assert out.stdout.strip() == "ok", out.stdout


def _root() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    return root + os.pathsep + os.environ.get("PYTHONPATH", "")


def _accept_one(path: str, ready: threading.Event) -> tuple[socket.socket, Connection]:
    """Listen on ``path``, say so, and accept one peer (within 10 s) as a bare
    Connection; the caller closes both."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    ready.set()
    try:
        peer, _ = listener.accept()
    except BaseException:
        listener.close()
        raise
    return listener, Connection(peer, 10.0)


def _publisher_of_another_version(path: str, ready: threading.Event, seen: list[Any]) -> None:
    """A publisher that says hello with the next protocol version and notes what the client says."""
    listener, conn = _accept_one(path, ready)
    try:
        conn.send_bytes(HELLO + _version(PROTOCOL_VERSION + 1) + os.urandom(32))
        seen.append(bytes(conn.recv_bytes(256)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        seen.append(exc)
    finally:
        conn.close()
        listener.close()


def test_a_client_refuses_a_publisher_of_another_protocol_version(tmp_path: Path) -> None:
    path = str(tmp_path / "other.sock")
    ready, seen = threading.Event(), list[Any]()
    thread = threading.Thread(target=_publisher_of_another_version, args=(path, ready, seen), daemon=True)
    thread.start()
    try:
        assert ready.wait(5)
        with pytest.raises(ChannelError) as caught:
            connect(path, KEY, 5.0)
        assert isinstance(caught.value, VersionMismatch) and isinstance(caught.value, IPCError)
        assert (f"publisher speaks samsara_mp IPC protocol version {PROTOCOL_VERSION + 1}, "
                f"this client version {PROTOCOL_VERSION}") in str(caught.value)
        thread.join(5)
        # The client said its own version, so that the publisher can name both.
        assert seen == [HELLO + _version(PROTOCOL_VERSION)]
    finally:
        thread.join(10)
    assert not thread.is_alive()


def test_a_publisher_refuses_a_client_of_another_protocol_version(
    served: tuple[Server, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, path = served
    conn = _raw(path)
    try:
        nonce = bytes(conn.recv_bytes(256)[len(HELLO) + 2:])
        conn.send_bytes(HELLO + _version(PROTOCOL_VERSION + 1) + mac(KEY, nonce, CLIENT) + os.urandom(32))
        with pytest.raises(EOFError):
            conn.recv_bytes(256)
    finally:
        conn.close()
    wait_until(lambda: (f"client speaks samsara_mp IPC protocol version {PROTOCOL_VERSION + 1}, "
                        f"this publisher version {PROTOCOL_VERSION}") in caplog.text, 5, "the refusal logged")
    good = connect(path, KEY, 2.0)
    try:
        assert good.call("ping") == ("ping", ())
    finally:
        good.close()


def _send_raw(conn: Connection, data: bytes) -> None:
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.sendall(data)


@pytest.mark.parametrize("kind", ["garbage", "unknown-class", "list", "wrong-types", "huge-length"])
def test_a_malformed_request_is_refused_and_the_server_serves_on(
    served: tuple[Server, str], caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    server, path = served
    other = connect(path, KEY, 2.0)
    bad = connect(path, KEY, 2.0)
    try:
        if kind == "garbage":
            bad.send_bytes(b"\x00 this is no pickle")
        elif kind == "unknown-class":
            bad.send_bytes(b"\x80\x05c__no_such_module__\nThing\n.")
        elif kind == "list":
            bad.send(["ping", ()])
        elif kind == "wrong-types":
            bad.send((1, "not a tuple"))
        else:
            _send_raw(bad, HEADER.pack(MAX_FRAME + 1))
        if kind == "huge-length":
            with pytest.raises(EOFError):
                bad.recv()  # hung up on: nothing after that length can be read in step
        else:
            kind_, text = bad.recv()
            assert kind_ == "error" and "BadFrame" in text
            assert bad.call("ping") == ("ping", ())  # still in step
        assert other.call("ping") == ("ping", ())
        fresh = connect(path, KEY, 2.0)
        try:
            assert fresh.call("ping") == ("ping", ())
        finally:
            fresh.close()
        assert "samsara_mp publisher" in caplog.text
    finally:
        bad.close()
        other.close()


def test_the_same_trouble_is_logged_once_a_minute(
    served: tuple[Server, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, path = served
    conn = connect(path, KEY, 2.0)
    try:
        for _ in range(3):
            conn.send(["ping"])
            assert conn.recv()[0] == "error"
    finally:
        conn.close()
    lines = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"


def test_a_peer_stalled_in_its_handshake_holds_no_one_else(served: tuple[Server, str]) -> None:
    _, path = served
    stalled = _raw(path)  # says nothing
    try:
        started = time.monotonic()
        conn = connect(path, KEY, 1.0)
        try:
            assert conn.call("ping", timeout=1.0) == ("ping", ())
        finally:
            conn.close()
        assert time.monotonic() - started < 1.0
    finally:
        stalled.close()


def _slow_publisher(path: str, ready: threading.Event, stop: threading.Event) -> None:
    """A publisher that knows the key but takes 0.4 s over each step of the
    handshake: each read of the client's is within its own timeout, the whole is not."""
    listener, conn = _accept_one(path, ready)
    try:
        nonce = os.urandom(32)
        if stop.wait(0.4):
            return
        conn.send_bytes(HELLO + _version(PROTOCOL_VERSION) + nonce)
        theirs = bytes(conn.recv_bytes(256)[-32:])
        if stop.wait(0.4):
            return
        conn.send_bytes(b"#SMP-WELCOME#" + mac(KEY, theirs, SERVER))
    except (OSError, EOFError):
        pass  # the client gave up and hung up: what the test expects
    finally:
        conn.close()
        listener.close()


def test_a_peer_answering_each_step_late_cannot_hold_a_handshake_past_its_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "slow.sock")
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_slow_publisher, args=(path, ready, stop), daemon=True)
    thread.start()
    try:
        assert ready.wait(5)
        started = time.monotonic()
        with pytest.raises(IPCError):
            connect(path, KEY, 0.5)
        assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = Connection(ours, 0.3)
    try:
        yield conn, theirs
    finally:
        conn.close()
        theirs.close()


def test_a_receive_gives_up_at_its_deadline_on_half_a_frame(pair: tuple[Connection, socket.socket]) -> None:
    conn, peer = pair
    body = pickle.dumps(("ok", "x" * 100), protocol=5)
    peer.sendall(HEADER.pack(len(body)) + body[:10])
    started = time.monotonic()
    with pytest.raises(IPCTimeout):
        conn.recv()
    assert 0.25 <= time.monotonic() - started < 1.0
    assert conn.broken is not None
    peer.sendall(body[10:])  # the rest comes late: it must not be read as a frame of its own
    with pytest.raises(IPCError, match="unusable"):
        conn.recv()
    assert conn.poll(0)  # so that a waiting user finds out


def test_a_peer_trickling_a_frame_cannot_hold_a_receive_past_its_deadline(
    pair: tuple[Connection, socket.socket]
) -> None:
    conn, peer = pair
    frame = HEADER.pack(1000) + bytes(1000)
    stop = threading.Event()

    def trickle() -> None:
        for i in range(len(frame)):  # a byte each 0.05 s: every read is well within 0.3 s
            if stop.wait(0.05):
                return
            try:
                peer.sendall(frame[i:i + 1])
            except OSError:
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(IPCTimeout):
            conn.recv()
        assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_send_cut_short_by_its_deadline_leaves_the_connection_unusable(
    pair: tuple[Connection, socket.socket]
) -> None:
    conn, _ = pair  # the peer reads nothing
    started = time.monotonic()
    with pytest.raises(IPCTimeout):
        conn.send(b"x" * (32 * 1024 * 1024))
    assert time.monotonic() - started < 1.0
    assert conn.broken is not None and not conn.closed
    with pytest.raises(IPCError, match="unusable"):
        conn.send(("ping", ()))


def test_a_call_without_its_answer_leaves_the_connection_unusable(
    pair: tuple[Connection, socket.socket]
) -> None:
    conn, peer = pair
    with pytest.raises(IPCTimeout):
        conn.call("ping", timeout=0.1)
    late = pickle.dumps(("ok", "the answer to the first ping"))
    peer.sendall(HEADER.pack(len(late)) + late)
    with pytest.raises(IPCError, match="unusable"):
        conn.call("ping")


def test_detach_after_fork_closes_this_copy_once() -> None:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = Connection(ours, 1.0)
    del ours  # the connection holds the only reference: its collection must close nothing
    parents = socket.socket(fileno=os.dup(conn.fileno()))  # as a fork leaves it in the parent
    try:
        conn.detach_after_fork()
        assert conn.closed
        reused = os.open(os.devnull, os.O_RDONLY)  # likely the number just freed
        try:
            conn.close()
            del conn
            gc.collect()
            os.fstat(reused)  # still open: nothing closed that number again
        finally:
            os.close(reused)
        parents.sendall(b"still there")  # no shutdown reached the parent's connection
        assert peer.recv(100) == b"still there"
    finally:
        parents.close()
        peer.close()
