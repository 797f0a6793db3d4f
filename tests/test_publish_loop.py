"""The publish loop in-process against the real reference server: order, prepared batches, backlog."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_until

from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer
from samsara_mp.publish_loop import PublishLoop
from samsara_mp.ring import Ring


def _events(first: int, count: int) -> list[bytes]:
    return [
        json.dumps({"eventName": "e", "sourceId": "s", "timestamp": 1, "seq": i}).encode()
        for i in range(first, first + count)
    ]


@pytest.fixture
def make_loop(server: IngestServer) -> Iterator[Any]:
    loops: list[PublishLoop] = []

    def make(max_size: int = 100_000, **config: Any) -> tuple[PublishLoop, Ring]:
        settings = dict(url=server.url, publish_interval=50, min_buffer_size=1, max_batch_size=100,
                        backoff_base=10, backoff_cap=50)
        settings.update(config)
        buffer = Ring(max_size)
        loop = PublishLoop(buffer, Config.build(**settings))
        loops.append(loop)
        return loop, buffer

    yield make
    for loop in loops:
        loop.stop()


def _seqs(server: IngestServer) -> list[int]:
    return [e["seq"] for e in server.events()]


def test_batches_reach_the_api_in_buffer_order_and_a_failed_one_goes_first_again(
    server: IngestServer, make_loop: Any
) -> None:
    loop, buffer = make_loop()
    buffer.push(_events(0, 1000))
    server.inject(status=None, count=2, latency=0.05)
    server.inject(status=503, count=1)  # the third batch fails once: it is sent again, first
    loop.start()
    wait_until(lambda: len(buffer) == 0, 30, "the buffer to empty")
    assert _seqs(server) == list(range(1000))
    snap = buffer.snapshot()
    assert (snap["delivered"], snap["dropped_overflow"]) == (1000, 0)


def test_overflow_while_a_batch_is_in_flight_drops_only_what_waits_in_the_ring(
    server: IngestServer, make_loop: Any
) -> None:
    loop, buffer = make_loop(max_size=150, max_batch_size=50)
    buffer.push(_events(0, 150))
    server.inject(status=None, count=1, latency=1.0)
    loop.start()
    # Batch 0-49 is in flight (a slow answer); 70 more events overflow the bound:
    # 50-119 wait in the ring and the oldest 70 of them go, never the batch being sent.
    wait_until(lambda: buffer.in_flight is not None, 10, "a batch in flight")
    buffer.push(_events(150, 70))
    wait_until(lambda: len(buffer) == 0, 30, "the buffer to empty")
    assert _seqs(server) == list(range(50)) + list(range(120, 220))
    snap = buffer.snapshot()
    assert (snap["delivered"], snap["dropped_overflow"], snap["recorded"]) == (150, 70, 220)


def test_a_publisher_behind_sends_the_rest_at_once_not_at_the_next_interval(
    server: IngestServer, make_loop: Any
) -> None:
    loop, buffer = make_loop(publish_interval=600_000)  # the tick alone would wait 10 minutes
    buffer.push(_events(0, 250))
    loop.start()
    wait_until(lambda: server.event_count() == 250, 10, "the last 50 after two full batches")
    assert _seqs(server) == list(range(250))
    # Not behind (the last batch was partial): a small push waits for the tick.
    buffer.push(_events(250, 10))
    with pytest.raises(AssertionError):
        wait_until(lambda: server.event_count() > 250, 0.5, "nothing")


def test_fewer_events_than_min_buffer_size_go_once_the_oldest_waited_one_interval_not_two(
    server: IngestServer, make_loop: Any
) -> None:
    loop, buffer = make_loop(publish_interval=2000, min_buffer_size=100)
    loop.start()
    # The scenario, not a synchronisation: the event lands 0.6 s after the loop's
    # start, so the first tick (at 2 s) finds it 1.4 s old, short of an interval.
    time.sleep(0.6)
    pushed = time.monotonic()
    buffer.push(_events(0, 1))
    wait_until(lambda: server.event_count() == 1, 10, "the event to arrive")
    waited = time.monotonic() - pushed
    # At 2.0 s of age (2.6 s after the start), not at the second tick (3.4 s of age).
    assert 1.9 <= waited < 3.0, waited
