"""The IPC handshake: mutual proof of the authkey, and no OpenSSL on the way.

A uWSGI worker may make its first connection from its exit hook, which runs
after OpenSSL's atexit cleanup; ``test_uwsgi.py`` shows the crash end to end.
"""

from __future__ import annotations

import os
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

from samsara_mp.ipc import CLIENT, SERVER, IPCError, Server, TimedConnection, _mac, connect

KEY = bytes(range(32))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    path = str(tmp_path / "s.sock")
    server = Server(path, KEY, lambda method, args: (method, args), handshake_timeout=2.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, path
    finally:
        server.close()
        thread.join(5)
        assert not thread.is_alive()


def test_the_right_key_connects_and_calls(served: tuple[Server, str]) -> None:
    _, path = served
    conn = connect(path, KEY, 2.0)
    try:
        assert conn.call("echo", 1, "two", timeout=2.0) == ("echo", (1, "two"))
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


@pytest.mark.parametrize("answer", [b"", b"x" * 32, b"y" * 300], ids=["empty", "wrong", "oversized"])
def test_a_bad_answer_to_the_challenge_is_refused(served: tuple[Server, str], answer: bytes) -> None:
    _, path = served
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    conn = TimedConnection(sock.detach(), 2.0)
    try:
        challenge = conn.recv_bytes(256)
        assert challenge.startswith(b"#SMP-CHALLENGE#") and len(challenge) == 15 + 32
        conn.send_bytes(answer)
        if len(answer) <= 256:
            assert conn.recv_bytes(256) == b"#SMP-FAILURE#"
        with pytest.raises((EOFError, OSError)):
            conn.recv_bytes(256)  # and the server hangs up
    finally:
        conn.close()


_NO_OPENSSL = textwrap.dedent(r"""
    import sys, threading
    from samsara_mp.ipc import Server, connect
    path, key = sys.argv[1], bytes(range(32))
    server = Server(path, key, lambda method, args: method)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = connect(path, key, 5.0)
    assert conn.call("ping", timeout=5.0) == "ping"
    conn.close()
    server.close()
    print(sorted(m for m in ("_hashlib", "hmac", "_ssl", "hashlib") if m in sys.modules))
""")


def test_a_handshake_never_loads_openssl(tmp_path: Path) -> None:
    # multiprocessing's handshake imports hmac (OpenSSL's HMAC) at its first use.
    out = subprocess.run(
        [sys.executable, "-c", _NO_OPENSSL, str(tmp_path / "s.sock")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=_root()),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def _root() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    return root + os.pathsep + os.environ.get("PYTHONPATH", "")


@pytest.mark.parametrize(("answerer", "verdict"), [(CLIENT, b"#SMP-WELCOME#"), (SERVER, b"#SMP-FAILURE#")],
                         ids=["as-a-client", "as-the-server"])
def test_each_direction_has_its_own_answer(
    served: tuple[Server, str], answerer: bytes, verdict: bytes
) -> None:
    # A fake publisher that relays a client's challenge to the real one must not get
    # back an answer it could pass off as its own: the publisher's answers differ.
    _, path = served
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    conn = TimedConnection(sock.detach(), 2.0)
    try:
        nonce = conn.recv_bytes(256)[len(b"#SMP-CHALLENGE#"):]
        conn.send_bytes(_mac(KEY, nonce, answerer))
        assert conn.recv_bytes(256) == verdict
    finally:
        conn.close()


def _accept_one(path: str, ready: threading.Event) -> tuple[socket.socket, Any]:
    """Listen on ``path``, say so, and accept one peer (within 10 s) as a bare
    ``multiprocessing`` Connection; the caller closes both."""
    from multiprocessing import connection as mpc

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
    return listener, mpc.Connection(peer.detach())


def _legacy_publisher(path: str, key: bytes, ready: threading.Event, seen: list[Any]) -> None:
    """One connection served the way an older samsara_mp publisher did: multiprocessing's
    handshake, then one request answered."""
    from multiprocessing import connection as mpc

    listener, conn = _accept_one(path, ready)
    try:
        mpc.deliver_challenge(conn, key)
        mpc.answer_challenge(conn, key)
        method, args = conn.recv()
        seen.append((method, args))
        conn.send(("ok", "pong"))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        seen.append(exc)
    finally:
        conn.close()
        listener.close()


@pytest.mark.parametrize("key", [KEY, bytes(32)], ids=["same-key", "wrong-key"])
def test_a_client_still_talks_to_a_publisher_of_an_older_release(tmp_path: Path, key: bytes) -> None:
    path = str(tmp_path / "old.sock")
    ready, seen = threading.Event(), list[Any]()
    thread = threading.Thread(target=_legacy_publisher, args=(path, KEY, ready, seen), daemon=True)
    thread.start()
    try:
        assert ready.wait(5)
        if key == KEY:
            conn = connect(path, key, 5.0)
            try:
                assert conn.call("ping", timeout=5.0) == "pong"
            finally:
                conn.close()
            thread.join(5)
            assert seen == [("ping", ())]
        else:
            with pytest.raises(IPCError, match="handshake"):
                connect(path, key, 5.0)
            thread.join(5)
            assert len(seen) == 1 and isinstance(seen[0], Exception)
    finally:
        thread.join(10)
    assert not thread.is_alive()


def _slow_publisher(path: str, ready: threading.Event, stop: threading.Event) -> None:
    """A publisher that knows the key but answers each step of the handshake after
    0.4 s: each read of the client's is within its own timeout, the whole is not."""
    listener, conn = _accept_one(path, ready)
    try:
        nonce = os.urandom(32)
        for step in range(3):
            if stop.wait(0.4):
                return
            if step == 0:
                conn.send_bytes(b"#SMP-CHALLENGE#" + nonce)
                conn.recv_bytes(256)
            elif step == 1:
                conn.send_bytes(b"#SMP-WELCOME#")
                theirs = conn.recv_bytes(256)[len(b"#SMP-CHALLENGE#"):]
            else:
                conn.send_bytes(_mac(KEY, theirs, SERVER))
    except OSError:
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
