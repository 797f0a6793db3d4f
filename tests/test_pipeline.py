"""End to end: real worker processes -> real publisher process -> real HTTP server."""

from __future__ import annotations

import json
import multiprocessing
from collections import defaultdict
from typing import Any

import pytest
from conftest import wait_until
from workers import record_many

from samsara_mp import Publisher, SamsaraClient
from samsara_mp.ingest import IngestServer
from samsara_mp.ledger import unaccounted


def _by_worker(events: list[dict[str, Any]]) -> dict[int, list[int]]:
    seqs: dict[int, list[int]] = defaultdict(list)
    for event in events:
        seqs[event["worker"]].append(event["seq"])
    return seqs


def _balanced(stats: dict[str, Any]) -> bool:
    return unaccounted({"staged": 0, **stats}) == 0


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_four_workers_deliver_every_event_once_in_order(
    method: str, server: IngestServer, publisher: Publisher, fast_config: dict[str, Any]
) -> None:
    ctx = multiprocessing.get_context(method)
    config = dict(fast_config, start_publishing_thread=False)
    procs = [ctx.Process(target=record_many, args=(config, w, 10_000)) for w in range(4)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert server.wait_for_events(40_000, 60), server.event_count()
    events = server.events()
    assert len(events) == 40_000
    seqs = _by_worker(events)
    assert sorted(seqs) == [0, 1, 2, 3]
    for worker, got in seqs.items():
        assert got == list(range(10_000)), f"worker {worker} out of order or duplicated"
    stats = wait_until(lambda: (s := publisher.stats())["buffered"] == 0 and s, 10, "empty buffer")
    assert stats["recorded"] == stats["delivered"] == 40_000
    assert stats["dropped_overflow"] == stats["rejected"] == 0
    assert _balanced(stats)


def test_client_elects_and_starts_a_publisher_when_none_runs(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    with SamsaraClient(sourceId="solo", idle_timeout=1_000, **fast_config) as client:
        for seq in range(100):
            client.record_event(eventName="test.event", seq=seq)
        assert client.flush(timeout=30)
        info = client.channel.read_info()
        assert info is not None and info["pid"] != 0
    assert server.wait_for_events(100, 10)
    assert [e["seq"] for e in server.events()] == list(range(100))
    # The auto-started publisher leaves by itself once idle with no clients.
    import os

    def gone() -> bool:
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, 20, "idle publisher to exit")


def test_overflow_drops_exactly_the_oldest_staged_and_counts_them(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # The ring (100) is full and the API down: what follows waits in staging (50), which
    # keeps its newest and drops its oldest, counted.
    server.set_online(False)
    config = dict(fast_config, max_buffer_size=100, staging_size=50)
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            for seq in range(100):
                client.record_event(eventName="test.event", seq=seq)
                if seq % 25 == 24:
                    assert client.ship(timeout=10)  # into the ring, before staging overflows
            for seq in range(100, 250):
                client.record_event(eventName="test.event", seq=seq)
            stats = client.stats()["channel"]
            assert stats["dropped_overflow"] == stats["dropped_staging"] == 100
            assert stats["buffered"] == 100 and stats["staged"] == 50
            assert stats["delivered"] == 0
            assert unaccounted(stats) == 0
            server.set_online(True)
            assert client.flush(timeout=30) is False  # 100 were dropped
        stats = pub.stats()
    assert [e["seq"] for e in server.events()] == list(range(100)) + list(range(200, 250))
    assert stats["delivered"] == 150 and stats["dropped_overflow"] == 100
    assert _balanced(stats)


def test_server_that_fails_then_recovers_gets_everything_once(
    server: IngestServer, publisher: Publisher, fast_config: dict[str, Any]
) -> None:
    server.inject(status=503, count=3)
    server.inject(status=429, count=1, retry_after="0")
    with SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config) as client:
        for seq in range(500):
            client.record_event(eventName="test.event", seq=seq)
        assert client.flush(timeout=30)
    assert [e["seq"] for e in server.events()] == list(range(500))
    stats = publisher.stats()
    assert stats["retries"] >= 4
    assert stats["delivered"] == 500 and _balanced(stats)


def _push_raw(pub: Publisher, payloads: list[bytes]) -> None:
    """Push pre-encoded bytes as a worker of another validation would."""
    conn = pub.channel.connect(5.0)
    try:
        conn.call("push", payloads, "raw", 1, (0, 0, 0))
    finally:
        conn.close()


def _event_bytes(seq: int, **override: Any) -> bytes:
    event: dict[str, Any] = {"eventName": "test.event", "sourceId": "raw", "timestamp": 1, "seq": seq}
    event.update(override)
    return json.dumps(event).encode()


def test_400_batch_delivers_the_97_valid_events_and_counts_3_rejected(
    server: IngestServer, publisher: Publisher
) -> None:
    bad = {10, 50, 99}
    payloads = [
        _event_bytes(i, timestamp="not-a-number") if i in bad else _event_bytes(i) for i in range(100)
    ]
    _push_raw(publisher, payloads)
    assert server.wait_for_events(97, 20)
    stats = wait_until(lambda: (s := publisher.stats())["buffered"] == 0 and s, 10, "settled")
    assert [e["seq"] for e in server.events()] == [i for i in range(100) if i not in bad]
    assert stats["rejected"] == 3 and stats["delivered"] == 97
    assert _balanced(stats)


def test_malformed_event_in_a_batch_is_isolated_by_splitting(
    server: IngestServer, publisher: Publisher
) -> None:
    payloads = [_event_bytes(i) for i in range(64)]
    payloads[37] = b'{"eventName": "broken"'  # the whole body stops being JSON: plain 400
    _push_raw(publisher, payloads)
    assert server.wait_for_events(63, 20)
    stats = wait_until(lambda: (s := publisher.stats())["buffered"] == 0 and s, 10, "settled")
    assert [e["seq"] for e in server.events()] == [i for i in range(64) if i != 37]
    assert stats["rejected"] == 1 and stats["delivered"] == 63


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_bodies_and_headers_on_the_wire(
    compression: str, server: IngestServer, fast_config: dict[str, Any]
) -> None:
    from samsara_mp.helpers import current_time_millis

    before = current_time_millis()
    client = SamsaraClient(
        sourceId="s", compression=compression, start_publishing_thread=False, **fast_config
    )
    events = [{"eventName": "e", "timestamp": 5, "n": i, "text": "héllo"} for i in range(10)]
    assert client.publish_events(events)
    client.close()
    [req] = [r for r in server.requests() if r["path"].endswith("/v1/events")]
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert headers["content-encoding"] == ("gzip" if compression == "gzip" else "identity")
    published = int(headers["x-samsara-publishedtimestamp"])
    assert before <= published <= current_time_millis()
    got = server.events()
    assert [{k: e[k] for k in ("eventName", "timestamp", "n", "text", "sourceId")} for e in got] == [
        dict(e, sourceId="s") for e in events
    ]
    assert all(e["publishedAt"] == published for e in got)
    assert events[0] == {"eventName": "e", "timestamp": 5, "n": 0, "text": "héllo"}  # not mutated


def test_endpoint_keeps_the_base_url_path_prefix(runtime_dir: str) -> None:
    with IngestServer(store="memory", prefix="/api/samsara") as srv:
        client = SamsaraClient(
            url=srv.url + "/", sourceId="s", runtime_dir=runtime_dir, start_publishing_thread=False
        )
        assert client.config.endpoint == srv.url + "/v1/events"
        assert client.publish_events([{"eventName": "e", "timestamp": 1}])
        client.close()
        assert srv.event_count() == 1
        assert srv.requests()[0]["path"] == "/api/samsara/v1/events"


def _inline_worker(config: dict[str, Any], count: int, out: Any) -> None:
    client = SamsaraClient(sourceId="inline", shipper="inline", **config)
    for seq in range(count):
        client.record_event(eventName="test.event", seq=seq, worker=0)
    # Most events left from inside record_event, before any exit flush.
    out.put((client.threaded, client.stats()["channel"]["received"]))
    # No close(): the multiprocessing exit path must ship the rest.


def test_inline_shipping_without_threads_delivers_everything(
    server: IngestServer, publisher: Publisher, fast_config: dict[str, Any]
) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    config = dict(fast_config, start_publishing_thread=False)
    proc = ctx.Process(target=_inline_worker, args=(config, 5_000, out))
    proc.start()
    try:
        threaded, received_before_exit = out.get(timeout=60)
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    assert threaded is False
    # Most events left from record_event itself; the last push (one socket write, a few
    # hundred events) may still await its answer, and the exit path ships the rest.
    assert received_before_exit >= 5_000 // 2
    assert server.wait_for_events(5_000, 30)
    assert [e["seq"] for e in server.events()] == list(range(5_000))
