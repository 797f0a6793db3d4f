"""uWSGI end to end: a real master and 2 workers forked from C, the first worker electing the publisher.

Each run starts ``uwsgi --master --processes 2`` with the app loaded in the
master (so the client is created before the fork and reset by the
integration's post-fork hook), drives a bounded stream of requests, reloads
gracefully with SIGHUP in the middle, shuts down gracefully (the master
FIFO's ``q``) and checks that the events of every answered request arrived
exactly once. uWSGI's brutal stop (SIGINT, SIGQUIT) skips the exit hooks of a
worker still inside a request, including the after-request work that follows
its answer: a test below holds a worker there and shows both stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_until
from procs import alive as _alive
from procs import children as _children
from procs import free_port as _free_port
from procs import kill_if as _kill_if
from procs import stop

from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer
from samsara_mp.publisher import Publisher

APPS = Path(__file__).resolve().parent / "apps"
ROOT = APPS.parent.parent
CHANNEL = "u"
BIN = Path(sys.executable).parent


def _uwsgi() -> str:
    """The uwsgi binary of this environment; fails (never skips) when it is missing or broken."""
    path = shutil.which("uwsgi", path=str(BIN))
    if path is None:
        pytest.fail(f"uwsgi is not installed in {BIN}: install the project's 'test' extra")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.fail(f"{path} --version failed: {out.stderr}")
    return path


# ---- process helpers (by pid; nothing is killed by name) ----
def _get(session: requests.Session, url: str) -> tuple[int, str] | None:
    """The answering worker's pid and shipping mode, or None when there was no answer."""
    try:
        resp = session.get(url, timeout=10)
    except requests.RequestException:
        return None
    if resp.status_code != 200:
        return None
    return int(resp.text), resp.headers.get("X-Shipper", "")


def _env(server: IngestServer, runtime_dir: str, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        SAMSARA_MP_URL=server.url,
        SAMSARA_MP_CHANNEL=CHANNEL,
        SAMSARA_MP_RUNTIME_DIR=runtime_dir,
        SAMSARA_MP_PUBLISH_INTERVAL="100",
        SAMSARA_MP_MIN_BUFFER_SIZE="1",
        SAMSARA_MP_SOURCE_ID="uwsgi-test",
    )
    env.update(extra)
    return env


def _args(port: int, *extra: str) -> list[str]:
    return [
        _uwsgi(), "--master", "--processes", "2", "--http-socket", f"127.0.0.1:{port}",
        "--virtualenv", sys.prefix, "--chdir", str(APPS), "--module", "uwsgi_app",
        "--need-app", "--reload-mercy", "15", "--worker-reload-mercy", "15", *extra,
    ]


def _stop(master: subprocess.Popen[bytes], seen: set[int], publisher_pid: int | None) -> None:
    seen |= _children(master.pid)
    stop(master, signal.SIGINT, grace=30)
    for pid in seen:
        _kill_if(pid, "uwsgi")
    if publisher_pid is not None:
        _kill_if(publisher_pid, "samsara_mp.publisher")


def _launch(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


def _session_once_up(
    master: subprocess.Popen[bytes], port: int, log_path: Path
) -> tuple[requests.Session, str]:
    """A session to uWSGI, once it answers; its base URL."""
    session = requests.Session()
    session.headers["Connection"] = "close"  # neither server keeps connections alive
    base = f"http://127.0.0.1:{port}/"
    wait_until(lambda: master.poll() is not None or _get(session, base), 30, "uWSGI to answer")
    assert master.poll() is None, log_path.read_text()
    return session, base


def _send_fifo(fifo: Path, command: bytes) -> None:
    """One command to the master FIFO (``q``: graceful shutdown, ``r``: graceful reload)."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails at once if the master is not reading
    try:
        os.write(fd, command)
    finally:
        os.close(fd)


def _shut_down_gracefully(fifo: Path) -> None:
    """uWSGI 2.0's graceful shutdown: ``q`` on the master FIFO (no signal does it)."""
    _send_fifo(fifo, b"q")


def _log_digest(log_path: Path) -> str:
    """The uWSGI log without its request lines (the worker spawns, reloads and
    everything the app and samsara_mp logged), cut to its last 8000 characters."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines()
             if not line.startswith("[pid: ")]
    return "\n".join(lines)[-8000:]


def _balanced(stats: dict[str, Any]) -> bool:
    return bool(stats["recorded"] == (
        stats["delivered"] + stats["dropped_overflow"] + stats["rejected"] + stats["buffered"]
    ))


@pytest.mark.parametrize("threads", [True, False], ids=["enable-threads", "no-enable-threads"])
def test_every_answered_request_arrives_once_through_a_graceful_reload(
    threads: bool, server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    port = _free_port()
    # uWSGI sets sys.executable to its own binary; py-executable names the
    # interpreter that a worker starts the publisher with.
    python = str(Path(sys.prefix) / "bin" / "python")
    fifo = tmp_path / "master.fifo"
    args = _args(
        port, "--py-executable", python, "--master-fifo", str(fifo),
        *(["--enable-threads"] if threads else []),
    )
    log_path = tmp_path / "uwsgi.log"
    master = _launch(args, _env(server, runtime_dir), log_path)
    channel = Channel(Config.build(env={}, url=server.url, channel=CHANNEL, runtime_dir=runtime_dir))
    seen: set[int] = set()
    publisher_pid: int | None = None
    answered: dict[int, int] = {}  # request id -> pid of the worker that answered
    modes: set[str] = set()
    sent = 0

    def send() -> int | None:
        nonlocal sent
        rid, sent = sent, sent + 1
        got = _get(session, f"{base}?rid={rid}")
        if got is None:
            return None
        answered[rid] = got[0]
        modes.add(got[1])
        return got[0]

    try:
        session, base = _session_once_up(master, port, log_path)
        for _ in range(100):
            send()
        info = wait_until(channel.read_info, 15, "a worker to elect a publisher")
        publisher_pid = int(info["pid"])
        assert info["owner_pid"] is None, "elected, not owned"
        before = set(answered.values())
        seen |= _children(master.pid)

        os.kill(master.pid, signal.SIGHUP)
        wait_until(
            lambda: (pid := send()) is not None and pid not in before and pid,
            30, "a worker forked after the reload to answer",
        )
        for _ in range(100):
            send()
        # A reload resets the few connections caught in it; those are not answered.
        assert sent <= 1_000 and len(answered) >= 0.9 * sent, (sent, len(answered))
        seen |= _children(master.pid)

        # A graceful shutdown: a worker still finishing a request ships at its end.
        _shut_down_gracefully(fifo)
        assert master.wait(30) == 0, log_path.read_text()

        # The publisher outlives uWSGI (it was elected, not owned): it holds what
        # the workers shipped, down to the staged events they shipped at exit.
        last: dict[str, Any] = {}

        def settled() -> dict[str, Any] | None:
            conn = channel.connect(5.0)
            try:
                stats: dict[str, Any] = conn.call("stats")
            finally:
                conn.close()
            events = server.events()
            arrived = {e["rid"] for e in events if e["eventName"] == "test.request"}
            done = stats["buffered"] == 0 and stats["delivered"] == len(events)
            last.update(stats=stats, missing=sorted(set(answered) - arrived))
            return stats if done and not last["missing"] else None

        try:
            stats = wait_until(settled, 20, "every answered request's event to arrive")
        except AssertionError as exc:
            missing = last.get("missing", [])
            by = Counter(answered[rid] for rid in missing)
            raise AssertionError(
                f"{exc}\nmissing {len(missing)} of {len(answered)}: {missing[:50]} by worker {dict(by)}"
                f"\nstats {last.get('stats')}\nuWSGI log:\n{_log_digest(log_path)}"
            ) from None
        assert _balanced(stats), stats
        assert stats["dropped_overflow"] == stats["rejected"] == 0, stats
        assert stats["publisher_pid"] == publisher_pid, "one publisher served the whole run"
        os.kill(publisher_pid, signal.SIGTERM)
        wait_until(lambda: not _alive(publisher_pid), 20, "the publisher to drain and exit")
    finally:
        _stop(master, seen, publisher_pid)

    leftover = [pid for pid in seen if _alive(pid)]
    assert not leftover, f"workers left running: {leftover}"
    assert set(answered.values()) - before, "the reload replaced the workers"
    if threads:
        assert modes == {"thread"}, modes

    events = [e for e in server.events() if e["eventName"] == "test.request"]
    rids = Counter(e["rid"] for e in events)
    duplicated = {rid: n for rid, n in rids.items() if n > 1}
    assert not duplicated, f"events delivered more than once: {duplicated}"
    assert set(rids) <= set(range(sent))
    assert set(answered) <= set(rids)
    assert all(e["pid"] == answered[e["rid"]] for e in events if e["rid"] in answered)


def test_ship_after_request_leaves_nothing_staged_in_an_idle_worker(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    # Inline shipping alone would keep the last event staged until the next
    # request; the after-request hook ships it while the worker sits idle.
    port = _free_port()
    env = _env(
        server, runtime_dir, SAMSARA_MP_SHIPPER="inline", SMP_TEST_SHIP_AFTER_REQUEST="1"
    )
    python = str(Path(sys.prefix) / "bin" / "python")
    log_path = tmp_path / "uwsgi.log"
    master = _launch(_args(port, "--py-executable", python), env, log_path)
    channel = Channel(Config.build(env={}, url=server.url, channel=CHANNEL, runtime_dir=runtime_dir))
    seen: set[int] = set()
    publisher_pid: int | None = None
    try:
        session, base = _session_once_up(master, port, log_path)
        seen |= _children(master.pid)
        answers = {rid: _get(session, f"{base}?rid={rid}") for rid in range(4)}
        answered = {rid for rid, got in answers.items() if got is not None}
        modes = {got[1] for got in answers.values() if got is not None}
        assert len(answered) >= 3 and modes == {"inline"}, answers
        # No further request comes: only the after-request hook can have shipped them.
        assert server.wait_for_events(len(answered), 15), server.event_count()
        info = channel.read_info()
        publisher_pid = int(info["pid"]) if info else None
        assert answered <= {e["rid"] for e in server.events()} <= set(answers)
    finally:
        _stop(master, seen, publisher_pid)
        if publisher_pid is not None:
            wait_until(lambda: not _alive(publisher_pid), 10, "the killed publisher to go")


def test_a_worker_elects_a_publisher_without_py_executable(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    port = _free_port()
    env = _env(server, runtime_dir, SAMSARA_MP_EXIT_TIMEOUT="1000")
    log_path = tmp_path / "uwsgi.log"
    master = _launch(_args(port, "--enable-threads"), env, log_path)
    channel = Channel(Config.build(env={}, url=server.url, channel=CHANNEL, runtime_dir=runtime_dir))
    seen: set[int] = set()
    publisher_pid: int | None = None
    try:
        session, base = _session_once_up(master, port, log_path)
        seen |= _children(master.pid)
        # Polled: on a loaded machine a worker's first request can outlast one GET's timeout.
        wait_until(lambda: _get(session, base + "?rid=0"), 30, "a recording request to be answered")
        info = wait_until(channel.read_info, 5, "a worker to elect a publisher")
        publisher_pid = int(info["pid"])
        assert server.wait_for_events(1, 10)
    finally:
        _stop(master, seen, publisher_pid)


def test_the_example_ini_serves_and_delivers(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    example = ROOT / "examples" / "uwsgi"
    port = _free_port()
    ini = tmp_path / "uwsgi.ini"
    ini.write_text(
        (example / "uwsgi.ini").read_text().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    )
    env = _env(server, runtime_dir, VIRTUAL_ENV=sys.prefix, SAMSARA_MP_SOURCE_ID="example-web")
    log_path = tmp_path / "uwsgi.log"
    master = _launch([_uwsgi(), "--ini", str(ini), "--chdir", str(example), "--need-app"], env, log_path)
    channel = Channel(Config.build(env={}, url=server.url, channel=CHANNEL, runtime_dir=runtime_dir))
    seen: set[int] = set()
    publisher_pid: int | None = None
    try:
        session = requests.Session()
        session.headers["Connection"] = "close"
        url = f"http://127.0.0.1:{port}/hello"
        wait_until(lambda: master.poll() is not None or _get_ok(session, url), 30, "the example")
        assert master.poll() is None, log_path.read_text()
        # uWSGI's http-socket resets the odd connection (also with a bare app),
        # and a reset request may or may not have reached the app.
        answered = 1 + sum(_get_ok(session, url) for _ in range(8))
        seen |= _children(master.pid)
        info = wait_until(channel.read_info, 15, "a worker to elect a publisher")
        publisher_pid = int(info["pid"])
        assert server.wait_for_events(answered, 15), server.event_count()
        master.send_signal(signal.SIGINT)
        assert master.wait(30) == 0, log_path.read_text()
        os.kill(publisher_pid, signal.SIGTERM)
        wait_until(lambda: not _alive(publisher_pid), 20, "the publisher to drain and exit")
    finally:
        _stop(master, seen, publisher_pid)
    views = [e for e in server.events() if e["eventName"] == "page.view"]
    assert answered >= 5 and answered <= len(views) <= 9
    assert {e["path"] for e in views} == {"/hello"}


def _get_ok(session: requests.Session, url: str) -> bool:
    try:
        return session.get(url, timeout=10).status_code == 200
    except requests.RequestException:
        return False


def _inline_workers_and_an_owned_publisher(
    server: IngestServer, runtime_dir: str, tmp_path: Path, **env: str
) -> tuple[Publisher, subprocess.Popen[bytes], int, Path, Path]:
    """A publisher the test owns, and uWSGI (with a master FIFO) whose workers ship
    inline: a lone event stays staged until something ships it. The caller stops both."""
    fifo = tmp_path / "master.fifo"
    log_path = tmp_path / "uwsgi.log"
    python = str(Path(sys.prefix) / "bin" / "python")
    pub = Publisher(
        url=server.url, channel=CHANNEL, runtime_dir=runtime_dir, publish_interval=100,
        min_buffer_size=1, send_client_stats=False,
    ).start()
    port = _free_port()
    args = _args(port, "--py-executable", python, "--master-fifo", str(fifo))
    try:
        master = _launch(args, _env(server, runtime_dir, SAMSARA_MP_SHIPPER="inline", **env), log_path)
    except BaseException:
        pub.stop()
        raise
    return pub, master, port, fifo, log_path


@pytest.mark.parametrize("stop", ["graceful", "SIGINT"])
def test_a_stop_while_a_worker_finishes_an_answered_request(
    stop: str, server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    # uWSGI closes the client's connection, then runs its after-request work
    # (here slowed to 2 s) before the worker counts as idle. Inline shipping
    # keeps a lone event staged until the worker's exit hook ships it.
    pub, master, port, fifo, log_path = _inline_workers_and_an_owned_publisher(
        server, runtime_dir, tmp_path, SMP_TEST_AFTER_REQUEST_DELAY="2"
    )
    seen: set[int] = set()
    try:
        session, base = _session_once_up(master, port, log_path)
        seen |= _children(master.pid)
        # uWSGI's http-socket resets the odd connection: try fresh ids until one is answered.
        tried: list[int] = []

        def answered_one() -> int | None:
            tried.append(rid := 7 + len(tried))
            got = _get(session, f"{base}?rid={rid}")
            assert got is None or got[1] == "inline", got
            return rid if got is not None else None

        rid = wait_until(answered_one, 30, "a recording request to be answered")
        # The answer is in; its worker sleeps in the after-request hook for 2 s.
        if stop == "graceful":
            _shut_down_gracefully(fifo)
        else:
            master.send_signal(signal.SIGINT)
        assert master.wait(30) == 0, log_path.read_text()
        conn = pub.channel.connect(5.0)
        try:
            assert conn.call("flush", 10.0, timeout=15.0), "the publisher sent all it holds"
        finally:
            conn.close()
        rids = [e["rid"] for e in server.events() if e["eventName"] == "test.request"]
        assert set(rids) <= set(tried) and len(rids) == len(set(rids)), (rids, tried)
        if stop == "graceful":
            # The worker finished its request, then its exit hook shipped the event.
            assert rid in rids, _log_digest(log_path)
        else:
            # A brutal stop kills a busy worker without its exit hooks: the
            # staged event is lost, as the README says, and no hook ran to log it.
            assert rid not in rids, rids
            assert "Gracefully killing worker" not in log_path.read_text()
    finally:
        _stop(master, seen, None)
        pub.stop()
    leftover = [pid for pid in seen if _alive(pid)]
    assert not leftover, f"workers left running: {leftover}"


@pytest.mark.parametrize("command", [b"q", b"r"], ids=["shutdown", "reload"])
def test_an_idle_worker_that_never_connected_ships_at_its_graceful_exit(
    command: bytes, server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    # An idle worker told to go (graceful shutdown or reload) calls exit() from
    # its signal handler. C atexit handlers run last-registered first, so once
    # the worker has used OpenSSL (here hashlib, as any session or CSRF token
    # does) OpenSSL's cleanup has run by the time uWSGI's exit hook calls ours.
    # The worker's first connection is made there: its handshake must not need
    # OpenSSL (an HMAC handshake crashed the worker, losing what it staged).
    pub, master, port, fifo, log_path = _inline_workers_and_an_owned_publisher(server, runtime_dir, tmp_path)
    seen: set[int] = set()
    try:
        session, base = _session_once_up(master, port, log_path)
        seen |= _children(master.pid)
        got = wait_until(lambda: _get(session, base + "?rid=7&hash=x"), 30, "the recording request")
        assert got[1] == "inline", got
        # A lone inline event stays staged: nothing connects before the exit hook.
        wait_until(lambda: "GET /?rid=7&hash=x " in log_path.read_text(), 10, "its request to be logged")
        assert pub.stats()["clients_seen"] == 0
        _send_fifo(fifo, command)
        if command == b"r":
            wait_until(lambda: log_path.read_text().count("spawned uWSGI worker 1 ") == 2, 30,
                       "the reload's new workers")
            seen |= _children(master.pid)
        conn = pub.channel.connect(5.0)
        try:
            wait_until(lambda: server.event_count() >= 1 or conn.call("flush", 0.5, timeout=5.0)
                       and server.event_count() >= 1, 15, "the exit hook's event to arrive")
        finally:
            conn.close()
        digest = _log_digest(log_path)
        assert "Segmentation Fault" not in digest, digest
        assert [e["rid"] for e in server.events() if e["eventName"] == "test.request"] == [7]
        _send_fifo(fifo, b"q")
        assert master.wait(30) == 0, _log_digest(log_path)
    finally:
        _stop(master, seen, None)
        pub.stop()
    leftover = [pid for pid in seen if _alive(pid)]
    assert not leftover, f"workers left running: {leftover}"
