"""Backpressure: at the default configuration a burst far larger than the ring waits in the
workers' staging and arrives whole, and flush() says True only when nothing was lost."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from typing import Any

from conftest import wait_until

from samsara_mp import SamsaraClient
from samsara_mp.ledger import unaccounted
from samsara_mp.ring import Ring


def _burst(client: SamsaraClient, worker: int, n: int, out: Any) -> None:
    for seq in range(n):
        client.record_event(eventName="burst", sourceId=f"w{worker}", seq=seq, worker=worker,
                            pad="x" * 16)
    out.put((worker, client.flush(timeout=120), client.stats()["local"]))


def _forked_worker(client: SamsaraClient, worker: int, n: int, out: Any) -> None:
    _burst(client, worker, n, out)


def _spawned_worker(config: dict[str, Any], worker: int, n: int, out: Any) -> None:
    with SamsaraClient(**config) as client:
        _burst(client, worker, n, out)


def _check_delivery(server: Any, workers: int, per: int) -> None:
    events = server.events()
    by_worker: dict[int, list[int]] = {}
    for e in events:
        by_worker.setdefault(e["worker"], []).append(e["seq"])
    assert len(events) == workers * per, f"{len(events)} of {workers * per} delivered"
    for worker in range(workers):
        assert by_worker[worker] == list(range(per)), f"worker {worker}: lost, duplicated or reordered"


def _run(ctx: Any, target: Any, args_of: Any, workers: int) -> list[tuple[int, bool, dict[str, Any]]]:
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(i), out)) for i in range(workers)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
    return results


def test_burst_of_forked_workers_at_the_defaults_arrives_whole(server: Any, runtime_dir: str) -> None:
    # Only url and channel: the ring (10,000) holds a tenth of the burst at most.
    config = {"url": server.url, "channel": "burst-fork", "runtime_dir": runtime_dir}
    client = SamsaraClient(**config)  # made before fork, as a gunicorn app with preload
    workers, per = 4, 25_000
    try:
        results = _run(mp.get_context("fork"), _forked_worker,
                       lambda i: (client, i, per), workers)
        assert all(flushed for _w, flushed, _local in results), results
        assert all(local["dropped_staging"] == 0 for _w, _f, local in results)
        _check_delivery(server, workers, per)
        stats = client.stats()["channel"]
        assert stats["dropped_overflow"] == 0 and stats["delivered"] == workers * per
        assert unaccounted(stats) == 0, stats
    finally:
        client.close()


def test_burst_of_spawned_workers_with_own_clients_at_the_defaults(server: Any, runtime_dir: str) -> None:
    config = {"url": server.url, "channel": "burst-spawn", "runtime_dir": runtime_dir}
    workers, per = 8, 12_500
    results = _run(mp.get_context("spawn"), _spawned_worker, lambda i: (config, i, per), workers)
    assert all(flushed for _w, flushed, _local in results), results
    _check_delivery(server, workers, per)


def test_flush_is_false_when_staging_dropped_events(server: Any, runtime_dir: str) -> None:
    # A staging of 100 events, and no publisher reachable while 300 are recorded.
    config = {"url": server.url, "channel": "tiny", "runtime_dir": runtime_dir, "staging_size": 100,
              "sourceId": "s", "start_publishing_thread": False}
    with SamsaraClient(**config) as client:
        for seq in range(300):
            client.record_event(eventName="e", seq=seq)
        assert client.stats()["local"]["dropped_staging"] == 200
        from samsara_mp import Publisher

        with Publisher(url=server.url, channel="tiny", runtime_dir=runtime_dir):
            assert client.flush(timeout=20) is False  # 200 were lost here
            assert sorted(e["seq"] for e in server.events()) == list(range(200, 300))  # the newest
            client.record_event(eventName="e", seq=300)
            assert client.flush(timeout=20) is True  # nothing lost since the last flush


def test_ring_grants_each_client_a_fair_share() -> None:
    ring = Ring(max_size=1000)
    fast_taken, fast_room = ring.push([b"{}"] * 1000, "fast", 1)
    assert fast_taken == 1000 and fast_room == 0  # alone: the whole ring
    assert ring.push([b"{}"] * 10, "slow", 1) == (0, 0)  # nothing free until a batch leaves
    batch = ring.take(500, 1 << 20)
    assert batch is not None
    ring.settle(batch, range(500), [])
    # 500 free, two clients: the fast one holds more than its share and gets nothing.
    assert ring.push([b"{}"] * 100, "fast", 2) == (0, 0)
    taken, _room = ring.push([b"{}"] * 800, "slow", 2)
    assert taken == 500
    snap = ring.snapshot()
    assert snap["dropped_buffer"] == 0 and snap["refused_events"] == 10 + 100 + 300


def test_overflow_never_drops_the_batch_in_flight() -> None:
    ring = Ring(max_size=10)
    ring.push([b"%d" % i for i in range(10)])
    batch = ring.take(4, 1 << 20)
    assert batch is not None and batch.payloads == [b"0", b"1", b"2", b"3"]
    ring.push([b"%d" % i for i in range(10, 16)])  # the publisher's own events: drop-oldest
    assert ring.snapshot()["dropped_buffer"] == 6  # 4..9 went, 0..3 are in flight
    ring.settle(batch, [0, 1], [])  # 2 and 3 failed: they stay in flight, first
    again = ring.take(10, 1 << 20)
    assert again is not None and again.payloads == [b"2", b"3"]
    ring.settle(again, [0, 1], [])
    rest = ring.take(10, 1 << 20)
    assert rest is not None and rest.payloads == [b"%d" % i for i in range(10, 16)]
    ring.settle(rest, range(6), [])
    snap = ring.snapshot()
    assert snap["delivered"] == 10 and snap["buffered"] == 0
    assert unaccounted({**snap, "staged": 0}) == 0


def test_sustained_overload_drops_in_staging_oldest_first(server: Any, runtime_dir: str) -> None:
    # The API answers 503 to everything: the ring fills and stays full; the worker's
    # staging (500 events here) keeps its newest and counts what it dropped.
    server.set_online(False)
    config = {"url": server.url, "channel": "overload", "runtime_dir": runtime_dir,
              "max_buffer_size": 1000, "staging_size": 500, "send_client_stats": False, "sourceId": "s"}
    with SamsaraClient(**config) as client:
        for chunk in range(4):
            for seq in range(chunk * 250, chunk * 250 + 250):
                client.record_event(eventName="e", seq=seq)
            wait_until(lambda: client.stats()["local"]["staged"] == 0, 20, "staging shipped")
        for seq in range(1000, 3000):
            client.record_event(eventName="e", seq=seq)
        local = client.stats()["local"]
        assert local["dropped_staging"] == 1500 and local["staged"] == 500
        stats = client.stats()["channel"]
        assert stats["buffered"] == 1000 and stats["dropped_buffer"] == 0
        assert unaccounted(stats) == 0, stats
        server.set_online(True)
        assert client.flush(timeout=30) is False  # the oldest staged were dropped
        seqs = [e["seq"] for e in server.events()]
        assert seqs == list(range(1000)) + list(range(2500, 3000))
        assert client.flush(timeout=10) is True  # nothing lost since
