"""multiprocessing.Pool integration: real pools (fork, spawn, forkserver), owned publisher, HTTP."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import settled_stats

from samsara_mp import InvalidConfiguration, Publisher, get_client
from samsara_mp.ingest import IngestServer
from samsara_mp.integrations.multiprocessing import (
    PoolPublisher,
    initializer_args,
    install_sigterm_handler,
)

N = 3000
# Workers keep every event staged until they exit: the shipper neither fills a
# batch nor reaches its delay, so only the exit paths under test can ship.
LAZY = {"ship_delay": 600_000, "ship_batch": 50_000, "staging_size": 50_000}
METHODS = ["fork", "spawn", "forkserver"]


# ---- worker-process bodies (module level: importable under spawn) ----
def record_one(n: int) -> int:
    get_client().record_event(eventName="pool.task", sourceId=f"w{os.getpid()}", n=n)
    return n


def _record_then_wait(config: dict[str, Any], setup: str, ready: Any, count: int) -> None:
    if setup == "ours, after a Python handler":
        def leave(signum: int, frame: Any) -> None:
            raise SystemExit(7)

        signal.signal(signal.SIGTERM, leave)
    client = get_client(**config)
    if setup != "none":
        install_sigterm_handler(2.0)
    for n in range(count):
        client.record_event(eventName="pool.task", sourceId="w", n=n)
    ready.set()
    while True:
        signal.pause()


# ---- helpers ----
def _balanced(stats: dict[str, Any]) -> bool:
    left = stats["delivered"] + stats["dropped_overflow"] + stats["rejected"] + stats["buffered"]
    return bool(stats["recorded"] == left)


def _numbers(server: IngestServer, name: str) -> Counter[int]:
    return Counter(e["n"] for e in server.events() if e["eventName"] == name)


# ---- tests ----
@pytest.mark.parametrize("ending", ["with-terminate", "close-join", "recycled"])
@pytest.mark.parametrize("method", METHODS)
def test_pool_workers_deliver_every_event_exactly_once(
    method: str, ending: str, server: IngestServer, fast_config: dict[str, Any]
) -> None:
    ctx = multiprocessing.get_context(method)
    with PoolPublisher(**fast_config, **LAZY) as pub:
        assert pub.owned
        if ending != "close-join":
            # maxtasksperchild counts chunks: 12 of 250 here, so 2 replaces each worker.
            recycle = 2 if ending == "recycled" else None
            with ctx.Pool(3, maxtasksperchild=recycle, **pub.pool_kwargs()) as pool:
                assert pool.map(record_one, range(N)) == list(range(N))
        else:
            pool = ctx.Pool(3, **pub.pool_kwargs())
            try:
                assert pool.map(record_one, range(N)) == list(range(N))
                pool.close()
                pool.join()
            finally:
                pool.terminate()
        # The workers are gone: what they shipped on the way out is all there is.
        stats = settled_stats(pub, N)
        assert stats["delivered"] == N and _balanced(stats)
    assert server.wait_for_events(N, 30), server.event_count()
    assert _numbers(server, "pool.task") == Counter(range(N))
    assert server.event_count() == N
    if ending == "recycled":
        assert len({e["sourceId"] for e in server.events()}) >= 6, "workers were not replaced"


def test_parent_client_made_before_a_fork_pool_is_not_duplicated_by_the_children(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    ctx = multiprocessing.get_context("fork")
    config = dict(fast_config, **LAZY)
    with PoolPublisher(**config) as pub:
        # get_client: the children inherit this very client as their default one.
        parent = get_client(**config)
        try:
            for n in range(100):
                parent.record_event(eventName="parent.event", sourceId="parent", n=n)
            assert parent.stats()["local"]["staged"] == 100
            with ctx.Pool(3, **pub.pool_kwargs()) as pool:
                assert pool.map(record_one, range(N)) == list(range(N))
            # The children shipped only their own events, not their copy of ours.
            stats = settled_stats(pub, N)
            assert stats["delivered"] == N
            assert parent.stats()["local"]["staged"] == 100
            assert parent.ship(timeout=10)
            stats = settled_stats(pub, N + 100)
            assert stats["delivered"] == N + 100 and _balanced(stats)
        finally:
            parent.close()
    assert server.wait_for_events(N + 100, 30)
    assert _numbers(server, "parent.event") == Counter(range(100))
    assert _numbers(server, "pool.task") == Counter(range(N))
    assert server.event_count() == N + 100


def test_pool_publisher_uses_a_publisher_the_channel_already_has(
    server: IngestServer, publisher: Publisher, fast_config: dict[str, Any]
) -> None:
    ctx = multiprocessing.get_context("fork")
    with PoolPublisher(**fast_config, **LAZY) as pub:
        assert not pub.owned
        with ctx.Pool(2, **pub.pool_kwargs()) as pool:
            pool.map(record_one, range(300))
    # Its exit flushed the other publisher, and left it running.
    assert server.event_count() == 300
    assert publisher.stats()["delivered"] == 300


SIGTERM_CASES = {
    # setup: (exit code after SIGTERM, events shipped)
    "ours": (-signal.SIGTERM, 50),
    "ours, after a Python handler": (7, 50),
    "none": (-signal.SIGTERM, 0),  # the control: SIGTERM's default skips every exit hook
}


@pytest.mark.parametrize("setup", list(SIGTERM_CASES))
def test_sigterm_handler_ships_then_does_what_sigterm_did_before(
    setup: str, server: IngestServer, publisher: Publisher, fast_config: dict[str, Any]
) -> None:
    exitcode, shipped = SIGTERM_CASES[setup]
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_record_then_wait, args=(dict(fast_config, **LAZY), setup, ready, 50))
    proc.start()
    try:
        assert ready.wait(20)
        proc.terminate()
        proc.join(20)
        assert proc.exitcode == exitcode
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    stats = settled_stats(publisher, shipped)
    assert stats["delivered"] == shipped
    assert _numbers(server, "pool.task") == Counter(range(shipped))


def test_initializer_args_validate_the_configuration_in_the_parent(runtime_dir: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        initializer_args(url="not a url", runtime_dir=runtime_dir)
    assert info.value.key == "url"
    init, args = initializer_args(print, ("hello",), url="http://127.0.0.1:1", term_timeout=1)
    assert args[0]["url"] == "http://127.0.0.1:1" and args[1:] == (1.0, print, ("hello",))


def test_the_pool_example_delivers_every_event(server: IngestServer, runtime_dir: str) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "pool"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_")}
    env.update(
        SAMSARA_MP_URL=server.url, SAMSARA_MP_RUNTIME_DIR=runtime_dir,
        SAMSARA_MP_SEND_CLIENT_STATS="false",
    )
    done = subprocess.run(
        [sys.executable, "pool_example.py", "500"], cwd=example, env=env,
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert "scored 500 items" in done.stdout
    # The example returned only after its publisher drained: nothing is still on its way.
    events = server.events()
    assert sorted(e["item"] for e in events) == list(range(500))
    assert {(e["eventName"], e["sourceId"]) for e in events} == {("item.scored", "pool-example")}


_DEFAULT_CONTEXT_POOL = """
import multiprocessing, sys
from samsara_mp import get_client

def work(n):
    get_client().record_event(eventName="fs.task", n=n)  # no config here: the parent's
    return n

if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver")  # Python 3.14's default on Linux
    client = get_client(url=sys.argv[1], runtime_dir=sys.argv[2], channel="fs", sourceId="fs",
                        publish_interval=50, min_buffer_size=1, send_client_stats=False)
    with multiprocessing.Pool(2) as pool:
        pool.map(work, range(200), chunksize=10)
        pool.close()
        pool.join()  # workers leave through their finalizers, which ship
    sys.exit(0 if client.flush(timeout=30) else 1)
"""


def test_a_default_context_forkserver_pool_gets_the_parents_get_client_config(
    server: IngestServer, runtime_dir: str, tmp_path: Any
) -> None:
    script = tmp_path / "fs_pool.py"
    script.write_text(_DEFAULT_CONTEXT_POOL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_MP_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, str(script), server.url, runtime_dir],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.wait_for_events(200, 30), server.event_count()
    assert _numbers(server, "fs.task") == Counter(range(200))


_PLAIN_POOL = """
import multiprocessing, sys
from samsara_mp import get_client

def work(n):
    get_client().record_event(eventName="plain.task", n=n)
    return n

if __name__ == "__main__":
    # A new user's Pool: default configuration, a cold channel, no PoolPublisher,
    # and `with`, whose exit terminate()s (SIGTERMs) the workers.
    client = get_client(url=sys.argv[1], runtime_dir=sys.argv[2], channel="plain", sourceId="p")
    with multiprocessing.get_context(sys.argv[3]).Pool(4) as pool:
        assert pool.map(work, range(2000)) == list(range(2000))
    sys.exit(0 if client.flush(timeout=30) else 1)
"""


@pytest.mark.parametrize("method", METHODS)
def test_a_plain_pool_left_by_with_delivers_what_its_workers_staged(
    method: str, server: IngestServer, runtime_dir: str, tmp_path: Any
) -> None:
    script = tmp_path / "plain_pool.py"
    script.write_text(_PLAIN_POOL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_MP_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, str(script), server.url, runtime_dir, method],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.wait_for_events(2000, 30), server.event_count()
    assert _numbers(server, "plain.task") == Counter(range(2000))

