"""gunicorn end to end: real masters and sync workers, the master owning the publisher.

Each run starts ``gunicorn -c tests/apps/gunicorn_conf.py`` with 4 sync
workers against the reference Ingestion API, drives a bounded stream of
requests, reloads the workers with SIGHUP and SIGKILLs one worker in the
middle, then stops the master with SIGTERM and checks what arrived.
"""

from __future__ import annotations

import os
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
from procs import get_pid, stop
from procs import kill_if as _kill_if

from samsara_mp import Publisher
from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer
from samsara_mp.integrations import gunicorn as smp

APPS = Path(__file__).resolve().parent / "apps"
ROOT = APPS.parent.parent
CHANNEL = "g"
STAGING_SIZE = 64  # the most a SIGKILLed worker can lose


# ---- process helpers (by pid; nothing is killed by name) ----
_get = get_pid


def _balanced(stats: dict[str, Any]) -> bool:
    return bool(stats["recorded"] == (
        stats["delivered"] + stats["dropped_overflow"] + stats["rejected"] + stats["buffered"]
    ))


# ---- the run ----
@pytest.mark.parametrize(
    ("preload", "post_request"),
    [(False, False), (True, False), (True, True)],
    ids=["fork-per-worker", "preload", "preload+post_request"],
)
def test_every_answered_request_arrives_once_through_hup_and_a_killed_worker(
    preload: bool, post_request: bool, server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    port = _free_port()
    marks = tmp_path / "marks"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        SAMSARA_MP_URL=server.url,
        SAMSARA_MP_CHANNEL=CHANNEL,
        SAMSARA_MP_RUNTIME_DIR=runtime_dir,
        SAMSARA_MP_PUBLISH_INTERVAL="100",
        SAMSARA_MP_MIN_BUFFER_SIZE="1",
        SAMSARA_MP_STAGING_SIZE=str(STAGING_SIZE),
        SAMSARA_MP_SOURCE_ID="gunicorn-test",
        SMP_TEST_MARKS=str(marks),
        SMP_TEST_POST_REQUEST="1" if post_request else "0",
        # 3.12+ warns when a multi-threaded process forks; the master forks every
        # worker (and again after SIGHUP) while it owns the publisher.
        PYTHONWARNINGS="default::DeprecationWarning",
    )
    args = [
        sys.executable, "-m", "gunicorn", "-c", str(APPS / "gunicorn_conf.py"),
        "--chdir", str(APPS), "--bind", f"127.0.0.1:{port}",
        *(["--preload"] if preload else []), "gunicorn_app:app",
    ]
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        master = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    channel = Channel(Config.build(env={}, url=server.url, channel=CHANNEL, runtime_dir=runtime_dir))
    seen: set[int] = set()
    publisher_pid: int | None = None
    base = f"http://127.0.0.1:{port}/"
    try:
        session = requests.Session()
        session.headers["Connection"] = "close"  # neither server keeps connections alive
        wait_until(lambda: master.poll() is not None or _get(session, base), 30, "gunicorn to answer")
        assert master.poll() is None, log_path.read_text()
        info = wait_until(channel.read_info, 10, "publisher.json")
        publisher_pid = int(info["pid"])
        assert info["owner_pid"] == master.pid, "the master owns the publisher"

        answered: dict[int, int] = {}  # request id -> pid of the worker that answered
        sent = 0

        def send() -> int | None:
            nonlocal sent
            rid, sent = sent, sent + 1
            pid = _get(session, f"{base}?rid={rid}")
            if pid is not None:
                answered[rid] = pid
            return pid

        for _ in range(100):
            send()
        before_hup = set(answered.values())
        seen |= _children(master.pid)
        os.kill(master.pid, signal.SIGHUP)
        for _ in range(100):
            send()
        victim = wait_until(
            lambda: (pid := send()) is not None and pid not in before_hup and pid,
            20, "a worker forked after SIGHUP to answer",
        )
        seen |= _children(master.pid)
        os.kill(victim, signal.SIGKILL)
        for _ in range(100):
            send()
        assert sent <= 1_000 and len(answered) >= 0.9 * sent, (sent, len(answered))
        seen |= _children(master.pid)

        # Quiet moment: every live worker has shipped and the publisher has sent all it holds.
        def settled() -> dict[str, Any] | None:
            conn = channel.connect(5.0)
            try:
                stats: dict[str, Any] = conn.call("stats")
            finally:
                conn.close()
            events = server.events()
            arrived = {e["rid"] for e in events if e["eventName"] == "test.request"}
            ok = stats["buffered"] == 0 and stats["delivered"] == len(events)
            waiting = [rid for rid, pid in answered.items() if pid != victim and rid not in arrived]
            return stats if ok and not waiting else None

        stats = wait_until(settled, 20, "the publisher to settle")
        assert _balanced(stats), stats
        assert stats["dropped_overflow"] == stats["rejected"] == 0, stats

        master.send_signal(signal.SIGTERM)
        assert master.wait(60) == 0, log_path.read_text()
        wait_until(lambda: not _alive(publisher_pid), 10, "the publisher to stop with the master")
    finally:
        seen |= _children(master.pid)
        stop(master, signal.SIGTERM, grace=30)
        for pid in seen:
            _kill_if(pid, "gunicorn")
        if publisher_pid is not None:
            _kill_if(publisher_pid, "samsara_mp.publisher")

    leftover = [pid for pid in seen if _alive(pid)]
    assert not leftover, f"workers left running: {leftover}"
    # Only the victim was killed: every other worker left within graceful_timeout.
    assert log_path.read_text().count("was sent SIGKILL") == 1, log_path.read_text()
    # The master that owns the publisher (and, with --preload, made a client) has no
    # samsara_mp thread when it forks: no "multi-threaded, use of fork()" warning.
    assert "multi-threaded" not in log_path.read_text(), log_path.read_text()[-3000:]

    # Every worker that answered was set up by the chained post_fork hook.
    assert set(answered.values()) <= {int(p) for p in marks.read_text().split()}
    assert set(answered.values()) - before_hup, "SIGHUP replaced the workers"

    # The publisher may add its own client-stats events; count the app's only.
    events = [e for e in server.events() if e["eventName"] == "test.request"]
    rids = Counter(e["rid"] for e in events)
    duplicated = {rid: n for rid, n in rids.items() if n > 1}
    assert not duplicated, f"events delivered more than once: {duplicated}"
    assert set(rids) <= set(range(sent))
    missing = set(answered) - set(rids)
    assert {answered[rid] for rid in missing} <= {victim}, (
        f"events missing from workers that were not killed: "
        f"{sorted((rid, answered[rid]) for rid in missing)}"
    )
    assert len(missing) <= STAGING_SIZE
    assert all(e["pid"] == answered[e["rid"]] for e in events if e["rid"] in answered)


# ---- hooks in-process ----
class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)

    error = warning = info


class _Server:
    def __init__(self) -> None:
        self.log = _Log()


def test_master_does_not_own_a_second_publisher_when_one_already_serves(
    publisher: Publisher, fast_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAMSARA_MP_URL", fast_config["url"])
    monkeypatch.setenv("SAMSARA_MP_CHANNEL", fast_config["channel"])
    monkeypatch.setenv("SAMSARA_MP_RUNTIME_DIR", fast_config["runtime_dir"])
    srv = _Server()
    smp.on_starting(srv)
    assert smp.publisher() is None
    assert any("already serves" in line for line in srv.log.lines), srv.log.lines
    smp.on_exit(srv)  # nothing owned: a no-op
    assert publisher.stats()["publisher_pid"] == publisher.pid


def test_chain_declares_the_arity_gunicorn_checks_and_calls_each_hook_in_order() -> None:
    from gunicorn.config import validate_callable, validate_post_request  # type: ignore[import-untyped]

    calls: list[tuple[Any, ...]] = []

    def mine(server: Any, worker: Any) -> None:
        calls.append(("mine", server, worker))

    def short(worker: Any, req: Any) -> None:
        calls.append(("short", worker, req))

    hook = smp.chain(smp.post_fork, mine)
    assert validate_callable(2)(hook) is hook
    hook("srv", "wrk")
    assert calls == [("mine", "srv", "wrk")]

    calls.clear()
    validated = validate_post_request(smp.chain(smp.post_request, short))
    validated("wrk", "req", {}, None)
    assert calls == [("short", "wrk", "req")]


def test_configure_exports_settings_for_workers_and_rejects_bad_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from samsara_mp import InvalidConfiguration

    for name in ("SAMSARA_MP_URL", "SAMSARA_MP_PUBLISH_INTERVAL", "SAMSARA_MP_SOURCE_ID",
                 "SAMSARA_MP_SEND_CLIENT_STATS", "SAMSARA_MP_CHANNEL", "SAMSARA_MP_EXIT_TIMEOUT"):
        monkeypatch.setenv(name, "")  # recorded, so configure()'s exports are undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("SAMSARA_MP_CHANNEL", "old")
    smp.configure(url="http://127.0.0.1:9/", publish_interval=250, sourceId="web",
                  send_client_stats=False, channel=None, exit_timeout=2_500)
    config = Config.build()
    assert (config.url, config.publish_interval, config.sourceId) == ("http://127.0.0.1:9/", 250, "web")
    assert config.send_client_stats is False and config.channel is None
    assert smp._worker_exit_timeout() == 2.5
    for bad in ({"no_such_key": 1}, {"publish_interval": 0}, {"exit_timeout": -1}):
        with pytest.raises(InvalidConfiguration):
            smp.configure(**bad)
    assert os.environ["SAMSARA_MP_PUBLISH_INTERVAL"] == "250"


def test_the_example_config_serves_and_delivers(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    example = ROOT / "examples" / "gunicorn"
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        SAMSARA_MP_URL=server.url,
        SAMSARA_MP_CHANNEL=CHANNEL,
        SAMSARA_MP_RUNTIME_DIR=runtime_dir,
    )
    args = [
        sys.executable, "-m", "gunicorn", "-c", str(example / "gunicorn.conf.py"),
        "--chdir", str(example), "--bind", f"127.0.0.1:{port}", "--workers", "2",
        "--no-control-socket", "app:app",
    ]
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        master = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    try:
        session = requests.Session()
        session.headers["Connection"] = "close"
        url = f"http://127.0.0.1:{port}/hello"
        wait_until(lambda: master.poll() is not None or _get_ok(session, url), 30, "the example")
        assert master.poll() is None, log_path.read_text()
        answered = 1 + sum(_get_ok(session, url) for _ in range(4))
        seen |= _children(master.pid)
        master.send_signal(signal.SIGTERM)
        assert master.wait(30) == 0, log_path.read_text()
    finally:
        seen |= _children(master.pid)
        if master.poll() is None:
            master.kill()
            master.wait(10)
        for pid in seen:
            _kill_if(pid, "gunicorn")
    views = [e for e in server.events() if e["eventName"] == "page.view"]
    assert answered == len(views) == 5 and {e["path"] for e in views} == {"/hello"}
    assert {e["sourceId"] for e in views} == {"example-web"}  # set by configure() in the master
    assert "records events with samsara_mp" in log_path.read_text()  # the chained hook ran


def _get_ok(session: requests.Session, url: str) -> bool:
    try:
        return session.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False
