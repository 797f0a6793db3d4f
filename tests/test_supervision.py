"""Long-lived publisher threads never die silently: errors are logged, counted, survived,
and a thread that cannot go on makes the publisher exit non-zero so another is elected.

An unexpected exception inside the publish loop is a bug of ours, which no real
input reaches today; a transport that raises stands in for it (the one thing here
that cannot be real), in front of the real reference server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from conftest import wait_until
from procs import alive

from samsara_mp import SamsaraClient
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer
from samsara_mp.publish_loop import PublishLoop
from samsara_mp.publisher import PublisherProcess
from samsara_mp.ring import Ring
from samsara_mp.supervise import GIVE_UP_AFTER
from samsara_mp.transport import Body, HTTPAnswer, Transport


class FailingTransport(Transport):
    """A real transport whose first ``failures`` posts raise a bug-like error."""

    def __init__(self, endpoint: str, failures: int) -> None:
        super().__init__(endpoint, 5.0)
        self.failures = failures

    def post(self, payloads: Sequence[bytes], body: Body | None = None) -> HTTPAnswer:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("a bug in the publish loop")
        return super().post(payloads, body)


def _events(count: int) -> list[bytes]:
    return [json.dumps({"eventName": "e", "sourceId": "s", "timestamp": 1, "seq": i}).encode()
            for i in range(count)]


def test_the_publish_loop_survives_unexpected_errors_and_delivers_everything_once(
    server: IngestServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config.build(url=server.url, publish_interval=20, min_buffer_size=1, max_batch_size=50,
                          backoff_base=10, backoff_cap=50)
    buffer = Ring(10_000)
    loop = PublishLoop(buffer, config, transport=FailingTransport(config.endpoint, failures=3))
    caplog.set_level(logging.ERROR, logger="samsara_mp")
    loop.start()
    try:
        buffer.push(_events(500))
        assert server.wait_for_events(500, 20)
        wait_until(lambda: len(buffer) == 0, 10, "the buffer to empty")
    finally:
        loop.stop()
    assert sorted(e["seq"] for e in server.events()) == list(range(500))
    assert loop.supervisor.errors == 3
    assert loop.supervisor.failed is None
    assert "a bug in the publish loop" in caplog.text  # logged with its traceback


def test_a_publish_loop_that_cannot_go_on_makes_the_publisher_exit_1_and_spool(
    server: IngestServer, runtime_dir: str
) -> None:
    config = Config.build(url=server.url, runtime_dir=runtime_dir, channel="sup", publish_interval=20,
                          min_buffer_size=1, backoff_base=5, backoff_cap=20, send_client_stats=False,
                          idle_timeout=0)
    proc = PublisherProcess(config)
    proc.loop._transport = FailingTransport(config.endpoint, failures=10**9)
    proc.loop._owns_transport = False  # kept across restarts: the bug stays
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(proc.run()), daemon=True)
    runner.start()
    try:
        wait_until(lambda: proc.channel.read_info(), 10, "the publisher to serve")
        proc.buffer.push(_events(40))
        runner.join(30)
    finally:
        proc.request_stop()  # this process is the publisher: never leave it serving
        runner.join(30)
    assert not runner.is_alive(), "the publisher did not give up on a loop that cannot go on"
    assert result == [1]
    assert proc.loop.supervisor.errors == GIVE_UP_AFTER
    stats = proc.stats()
    assert stats["loop_alive"] is False
    assert stats["spooled"] == 40 and stats["buffered"] == 0  # nothing lost: the next one sends it
    assert server.event_count() == 0
    # The next publisher on the channel delivers what the failed one spooled.
    with SamsaraClient(**dict(config.to_dict(), idle_timeout=2_000)) as client:
        assert client.flush(30)
    assert server.wait_for_events(40, 20)
    assert sorted(e["seq"] for e in server.events()) == list(range(40))


def _status(runtime_dir: str, channel: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "samsara_mp", "status", "--channel", channel, "--runtime-dir", runtime_dir],
        capture_output=True, text=True, timeout=60,
    )


def test_status_exits_1_when_events_wait_past_a_few_intervals_without_delivery(runtime_dir: str) -> None:
    with IngestServer(store="memory") as srv:
        url = srv.url
    # Nothing listens there any more: every POST fails.
    config: dict[str, Any] = dict(url=url, runtime_dir=runtime_dir, channel="stale", sourceId="s",
                                  publish_interval=100, send_timeout=500, min_buffer_size=1,
                                  send_client_stats=False, backoff_base=10, backoff_cap=100)
    client = SamsaraClient(**config)
    try:
        client.record_event(eventName="e")
        assert client.ship(30)
        done = wait_until(lambda: (r := _status(runtime_dir, "stale")).returncode == 1 and r, 30,
                          "status to report a stale channel")
        assert "STALE" in done.stdout
        assert "loop" in done.stdout and "alive" in done.stdout
    finally:
        client.close()
        info = client.channel.read_info()
        if info:
            os.kill(int(info["pid"]), signal.SIGTERM)
            wait_until(lambda: not alive(int(info["pid"])), 20, "the publisher to stop")


def test_status_exits_0_for_a_healthy_publisher(fast_config: dict[str, Any], publisher: Any) -> None:
    with SamsaraClient(sourceId="s", **fast_config) as client:
        client.record_event(eventName="e")
        assert client.flush(30)
    result = _status(fast_config["runtime_dir"], fast_config["channel"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alive" in result.stdout and "STALE" not in result.stdout
