"""Delivery under faults: a real server injecting each fault, real publisher and workers.

After every scenario the accounting adds up exactly and the delivered events are
the recorded ones minus the counted drops, with no duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from conftest import settled_stats, wait_until
from procs import stop

from samsara_mp import Publisher, SamsaraClient
from samsara_mp._procfs import process_running, process_start
from samsara_mp.ingest import IngestServer
from samsara_mp.ledger import unaccounted


def _balanced(s: dict[str, Any]) -> bool:
    return unaccounted({"staged": 0, **s}) == 0


def _record(client: SamsaraClient, count: int, name: str = "test.event") -> None:
    for seq in range(count):
        client.record_event(eventName=name, seq=seq)


def _seqs(server: IngestServer, name: str = "test.event") -> list[int]:
    return [e["seq"] for e in server.events() if e["eventName"] == name]


FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("connection reset", {"mode": "reset", "count": 2}),
    ("no answer (read timeout)", {"mode": "hang", "count": 1, "hang_seconds": 5}),
    ("500", {"status": 500, "count": 2}),
    ("502", {"status": 502, "count": 2}),
    ("503", {"status": 503, "count": 2}),
    ("504", {"status": 504, "count": 2}),
    ("408", {"status": 408, "count": 1}),
    ("429 without Retry-After", {"status": 429, "count": 2}),
    ("429 with Retry-After seconds", {"status": 429, "count": 1, "retry_after": "1"}),
    ("413 splits the batch", {"status": 413, "count": 1}),
]


@pytest.mark.parametrize(("name", "fault"), FAULTS, ids=[n for n, _ in FAULTS])
def test_publisher_survives_api_fault_and_loses_nothing(
    name: str, fault: dict[str, Any], server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = dict(fast_config, send_timeout=1_000)
    server.inject(**fault)
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 300)
            assert client.flush(timeout=30), pub.stats()
        stats = pub.stats()
    assert _seqs(server) == list(range(300))
    assert stats["delivered"] == 300 and _balanced(stats)
    assert stats["last_error"], "the fault should have been recorded as the last error"


def test_send_timeout_bounds_a_whole_post_even_when_the_api_trickles_its_answer(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # One byte every 0.5 s: about 70 s for the whole answer, each read well inside
    # a 1 s socket timeout. Only a bound on the whole request stops it.
    config = dict(fast_config, send_timeout=1_000)
    server.inject(mode="trickle", count=1, trickle_interval=0.5)
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 100)
            assert client.flush(timeout=15), pub.stats()
        stats = pub.stats()
    assert _seqs(server) == list(range(100))
    assert stats["retries"] == 1 and _balanced(stats)
    assert "send_timeout" in stats["last_error"]


def test_success_with_an_unexpected_body_counts_as_delivered_and_is_not_resent(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # The injected answer stands in for a proxy or API that took the batch and
    # said so in an unexpected way: a 2xx is a 2xx.
    server.inject(status=200, count=1, body="<html>surprise</html>")
    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config) as client:
            _record(client, 50)
            assert client.flush(timeout=30)
        stats = pub.stats()
    posts = [r for r in server.requests() if r["path"].endswith("/v1/events")]
    assert len(posts) == 1 and posts[0]["status"] == 200
    assert stats["delivered"] == 50 and stats["retries"] == 0 and _balanced(stats)


def test_retry_after_http_date_is_honoured(server: IngestServer, fast_config: dict[str, Any]) -> None:
    server.inject(status=503, count=1, retry_after=formatdate(time.time() + 1, usegmt=True))
    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config) as client:
            _record(client, 10)
            assert client.flush(timeout=30)
        stats = pub.stats()
    times = [r for r in server.requests() if r["path"].endswith("/v1/events")]
    assert stats["retries"] == 1 and len(times) == 2
    assert _seqs(server) == list(range(10))


def test_flush_does_not_cut_the_apis_retry_after_short(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    server.inject(status=503, count=1, retry_after="3")

    def posts() -> int:
        return sum(r["path"].endswith("/v1/events") for r in server.requests())

    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config) as client:
            _record(client, 10)
            assert client.ship(timeout=10)
            wait_until(lambda: (s := pub.stats())["failed_attempts"] == 1 and s["backoff_until"],
                       10, "the 503 and its Retry-After")
            # Impatient flushes inside the 3 s the API asked for: none may send.
            for _ in range(4):
                assert not client.flush(timeout=0.25)
            assert posts() == 1 and pub.stats()["backoff_until"], server.requests()
            assert client.flush(timeout=30)  # once the Retry-After has passed
        assert posts() == 2 and pub.stats()["retries"] == 1
    assert _seqs(server) == list(range(10))


def test_a_flush_waiting_out_a_retry_after_does_not_block_shipping_or_stats(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    server.inject(status=503, count=1, retry_after="20")
    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config) as client:
            _record(client, 5)
            assert client.ship(timeout=10)
            wait_until(lambda: pub.stats()["failed_attempts"] == 1, 10, "the 503")
            results: list[bool] = []
            flusher = threading.Thread(target=lambda: results.append(client.flush(timeout=6)))
            flusher.start()
            try:
                lock = client._link.lock

                def flush_waits() -> bool:  # on the publisher, whichever connection it took
                    if lock.acquire(blocking=False):
                        lock.release()
                        return bool(pub.stats()["connected_clients"] >= 2)
                    return True

                wait_until(flush_waits, 5, "the flush to wait on the publisher")
                client.record_event(eventName="test.event", seq=5)
                assert client.ship(timeout=1.0), "ship() waited behind the flush"
                assert client.stats()["channel"] is not None, "stats() waited behind the flush"
                assert flusher.is_alive()  # still waiting out the Retry-After
            finally:
                flusher.join(10)
            assert results == [False]
            server.clear_faults()


def test_concurrent_flushes_each_keep_their_timeout_during_a_retry_after(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = dict(fast_config, ipc_timeout=1_000)
    server.inject(status=503, count=1, retry_after="20")
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 5)
            assert client.ship(timeout=10)
            wait_until(lambda: pub.stats()["failed_attempts"] == 1, 10, "the 503")
            took: dict[float, float] = {}

            def flush(timeout: float) -> None:
                started = time.monotonic()
                assert client.flush(timeout=timeout) is False
                took[timeout] = time.monotonic() - started

            threads = [threading.Thread(target=flush, args=(t,)) for t in (2.0, 3.0)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(15)
            # Each within its own timeout plus one ipc_timeout, not queued behind the other.
            assert set(took) == {2.0, 3.0} and all(took[t] < t + 1.0 for t in took), took
            server.clear_faults()


def test_a_closed_client_keeps_no_connection_open(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with Publisher(**fast_config) as pub:
        own = pub.stats()["connected_clients"]  # the owner's own stats connection
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config)
        _record(client, 3)
        assert client.flush(timeout=10)
        assert client.stats()["channel"] is not None
        client.close()
        before = fds()
        # Used after close(): each call connects for itself, and nothing is kept.
        assert client.stats()["channel"]["delivered"] == 3
        client.record_event(eventName="test.event", seq=3)
        assert client.flush(timeout=10) and fds() == before
        assert client.close() and fds() == before
        wait_until(lambda: pub.stats()["connected_clients"] == own, 10, "the publisher to see none of its")


def test_long_outage_fills_the_ring_and_the_rest_waits_in_staging(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # Backpressure: the ring (500) takes what it has room for; the other 1,500 wait in
    # the worker's staging, and nothing is dropped while staging holds them.
    config = dict(fast_config, max_buffer_size=500, backoff_cap=100)
    server.set_online(False)
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 2_000)
            assert client.ship(timeout=1) is False  # no room for all of them
            stats = wait_until(
                lambda: (s := client.stats()["channel"])["buffered"] == 500 and s["retries"] >= 1 and s,
                10, "a full ring and a failed try",
            )
            assert stats["staged"] == 1_500 and stats["dropped_overflow"] == 0
            assert stats["recorded"] == 2_000 and _balanced(stats)
            server.set_online(True)
            assert client.flush(timeout=30)
        stats = pub.stats()
    assert _seqs(server) == list(range(2_000))
    assert stats["delivered"] == 2_000 and _balanced(stats)


def test_publisher_sigstop_does_not_block_record_event_and_nothing_is_duplicated(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = dict(fast_config, ipc_timeout=300, staging_size=50_000)
    with Publisher(**config) as pub:
        assert pub.pid is not None
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, **config)
        try:
            _record(client, 100, "before")
            assert client.flush(timeout=10)
            os.kill(pub.pid, signal.SIGSTOP)
            try:
                stopped_at = time.monotonic()
                calls = 0
                # Record for 10 s while the publisher is frozen: every call returns.
                while time.monotonic() - stopped_at < 10 and calls < 20_000:
                    client.record_event(eventName="during", seq=calls)
                    calls += 1
                    if calls % 500 == 0:
                        time.sleep(0.1)  # pace the load; not synchronisation
                local = client.stats()["local"]
                assert local["staged"] > 0  # the shipper could not push meanwhile
            finally:
                os.kill(pub.pid, signal.SIGCONT)
            assert client.flush(timeout=30)
        finally:
            client.close()
        stats = pub.stats()
    during = _seqs(server, "during")
    assert during == list(range(calls))
    assert stats["recorded"] == 100 + calls and _balanced(stats)
    assert stats["delivered"] == 100 + calls


@pytest.mark.parametrize("autostart", [False, True], ids=["connect-only", "may-elect"])
def test_ship_and_flush_keep_their_timeout_with_a_frozen_publisher(
    autostart: bool, server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # ipc_timeout far above the timeouts asked: the calls must cut their own waits short.
    config = dict(fast_config, ipc_timeout=5_000)
    with Publisher(**config) as pub:
        assert pub.pid is not None
        client = SamsaraClient(sourceId="s", start_publishing_thread=autostart, **config)
        try:
            _record(client, 10, "before")
            assert client.flush(timeout=10)
            os.kill(pub.pid, signal.SIGSTOP)
            try:
                client._link.drop_connection()  # the next push must connect (and may try to elect)
                _record(client, 10, "during")
                for call in (client.ship, client.flush):
                    started = time.monotonic()
                    assert call(timeout=0.5) is False
                    assert time.monotonic() - started < 1.5, call.__name__
            finally:
                os.kill(pub.pid, signal.SIGCONT)
            assert client.flush(timeout=30)
        finally:
            client.close()
    assert _seqs(server, "during") == list(range(10))


def _stuck_in_a_push(client: SamsaraClient) -> bool:
    """Record one event (something for the thread to push); True once the shipper
    thread holds the connection, i.e. is waiting on a push to a frozen publisher."""
    _record(client, 1, "during")
    if client._link.lock.acquire(blocking=False):
        client._link.lock.release()
        return False
    return True


def test_stats_and_close_keep_their_bound_while_the_shipper_is_stuck_on_a_frozen_publisher(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # The shipper thread holds the connection through a push for up to ipc_timeout;
    # stats() and close(timeout) must not add that wait to their own.
    config = dict(fast_config, ipc_timeout=3_000)
    with Publisher(**config) as pub:
        assert pub.pid is not None
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, **config)
        try:
            _record(client, 10, "before")
            assert client.flush(timeout=10)
            os.kill(pub.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: _stuck_in_a_push(client), 10, "the shipper thread to be stuck in a push")
                started = time.monotonic()
                stats = client.stats()
                assert time.monotonic() - started < 3.8 and stats["channel"] is None, stats
                wait_until(lambda: _stuck_in_a_push(client), 10, "the shipper thread to be stuck again")
                started = time.monotonic()
                assert client.close(timeout=1.0) is False
                assert time.monotonic() - started < 1.6
                assert client.discarded > 0
            finally:
                os.kill(pub.pid, signal.SIGCONT)
        finally:
            client.close()
    assert _seqs(server, "before") == list(range(10))


def test_a_closed_clients_stats_count_a_push_the_publisher_took_after_close_gave_up_once(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # close() gives up on a push in flight to a frozen publisher (it may or may not
    # have it) and discards what is still staged; the publisher, thawed, then takes
    # that push. The closed client's view of the channel must count the push once
    # and the discarded events as dropped, so that its accounting still adds up.
    config = dict(fast_config, ipc_timeout=3_000)
    with Publisher(**config) as pub:
        assert pub.pid is not None
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, **config)
        try:
            _record(client, 10, "before")
            assert client.flush(timeout=10)
            os.kill(pub.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: _stuck_in_a_push(client), 10, "the shipper thread to be stuck in a push")
                _record(client, 5, "after")  # staged behind the stuck push: discarded by close()
                assert client.close(timeout=0.5) is False
            finally:
                os.kill(pub.pid, signal.SIGCONT)
            local = client.stats()["local"]
            recorded = local["recorded"]
            # The publisher reads the push that was in its socket before close() shut it down.
            published = wait_until(lambda: (lambda s: s if s["buffered"] == 0 and s["recorded"]
                                            == recorded - local["discarded"] else None)(pub.stats()),
                                   10, "the publisher to take and deliver the stuck push")
            view = client.stats()
        finally:
            client.close()
    assert local["discarded"] >= 5 and published["delivered"] == recorded - local["discarded"]
    chan = view["channel"]
    assert view["local"]["staged"] == 0, view["local"]
    assert chan["recorded"] == recorded, chan
    assert chan["recorded"] == (chan["delivered"] + chan["dropped_overflow"] + chan["rejected"]
                                + chan["buffered"] + chan["staged"]), chan
    assert chan["dropped_staging"] == local["discarded"], chan
    assert len(server.events()) == published["delivered"]


@pytest.mark.parametrize("closed", [False, True], ids=["open", "after-close"])
def test_stats_taken_while_the_shipper_pushes_counts_every_event_once(
    closed: bool, server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # The local counts and the publisher's are read with no push of this process
    # between them, so the channel view counts every event once at any moment, under
    # load too: one client's channel has recorded exactly what the client recorded.
    with Publisher(**fast_config) as pub:
        assert pub.pid is not None
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config)
        if closed:  # a closed client still records and ships, from the caller's thread
            assert client.close(timeout=10)
        views: list[dict[str, Any]] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set() and len(views) < 60:
                stats = client.stats()
                if stats["channel"] is not None:
                    views.append(dict(stats["channel"], local_recorded=stats["local"]["recorded"]))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            started = time.monotonic()
            for seq in range(2_000_000):  # until the watcher has its views (bounded in time too)
                client.record_event(eventName="load", seq=seq)
                if closed and seq % 50 == 0:
                    client.ship(timeout=5)
                if seq % 1_000 == 0 and (len(views) >= 60 or time.monotonic() - started > 15):
                    break
        finally:
            done.set()
            watcher.join(30)
        # A loop this tight outruns the API: staging drops its oldest, so the flush may
        # rightly say False. What is checked is that every view counts each event once.
        client.flush(timeout=30)
        client.close()
    off = [v for v in views if v["recorded"] != v["local_recorded"] or v["recorded"] != v["delivered"]
           + v["dropped_overflow"] + v["rejected"] + v["buffered"] + v["staged"]]
    assert len(views) >= 20 and not off, (len(views), off[:3])


def test_stats_and_close_from_a_signal_handler_that_interrupts_a_push_use_no_connection(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # Inline shipping: record_event itself pushes, so a signal can land mid-push.
    # A handler's stats() must not talk on that connection (it read the push's
    # answer as its own), and its close() must neither push mid-message nor give
    # up what is staged: it is deferred, and the client ships at a later close().
    with Publisher(**fast_config) as pub:
        assert pub.pid is not None
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, shipper="inline",
                               ship_batch=500, **fast_config)
        seen: dict[str, Any] = {"stats": [], "errors": [], "close": None}

        def handler(signum: int, frame: Any) -> None:
            if not client._link.reentered():
                return  # not mid-push this time
            try:
                if len(seen["stats"]) < 20:
                    seen["stats"].append(client.stats())
                elif seen["close"] is None:
                    seen["close"] = client.close(timeout=2)
            except Exception as exc:  # noqa: BLE001 - the test reports what escaped
                seen["errors"].append(repr(exc))

        previous = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
        try:
            started, seq = time.monotonic(), 0
            while seen["close"] is None and time.monotonic() - started < 20 and seq < 2_000_000:
                client.record_event(eventName="load", seq=seq)
                seq += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, previous)
        try:
            assert seen["close"] is False and not client.closed and not seen["errors"], seen["errors"]
            assert seen["stats"] and all(s["channel"] is None and "signal handler" in s["error"]
                                         for s in seen["stats"])
            assert client.close(timeout=30)
        finally:
            client.close()
        stats = settled_stats(pub, seq)
    assert client.discarded == 0 and stats["delivered"] == seq
    assert sorted(_seqs(server, "load")) == list(range(seq))


_OLDER_PUBLISHER = r"""
import json, signal, sys
from samsara_mp.config import Config
from samsara_mp.publisher import PublisherProcess

class Older(PublisherProcess):  # a release before client_last_push: stats ignores the client's id
    def stats(self, client_id=None):
        return super().stats()

proc = Older(Config.build(env={}, **json.loads(sys.argv[1])))
signal.signal(signal.SIGTERM, proc.request_stop)
sys.exit(proc.run())
"""


_REFUSING_PUBLISHER = r"""
import json, signal, sys
from samsara_mp.channel import ChannelError
from samsara_mp.config import Config
from samsara_mp.publisher import PublisherProcess

class Refusing(PublisherProcess):  # as one shutting down answers every push
    def _answer(self, method, args):
        if method == "push":
            raise ChannelError("publisher is shutting down")
        return super()._answer(method, args)

proc = Refusing(Config.build(env={}, **json.loads(sys.argv[1])))
signal.signal(signal.SIGTERM, proc.request_stop)
sys.exit(proc.run())
"""


@pytest.mark.parametrize("shipper", ["thread", "inline"])
def test_a_push_the_publisher_refused_is_counted_as_discarded_by_the_close_that_gives_up(
    server: IngestServer, fast_config: dict[str, Any], shipper: str
) -> None:
    # The publisher answered "no": the push is not in its buffer, so a close() that
    # cannot ship it discards it and says so, rather than showing it staged for ever.
    proc = subprocess.Popen([sys.executable, "-c", _REFUSING_PUBLISHER, json.dumps(fast_config)])
    try:
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, shipper=shipper,
                               **fast_config)
        try:
            wait_until(lambda: client.stats()["channel"] is not None, 20, "the publisher to serve")
            _record(client, 10)
            recorded = 10
            if shipper == "thread":
                wait_until(lambda: client._link.failures > 0, 10, "a push refused")
            else:

                def written_and_answered() -> bool:
                    nonlocal recorded
                    client.record_event(eventName="test.event", seq=recorded)  # written inline
                    recorded += 1
                    conn = client._link.conn
                    return bool(client._shipper.awaiting and conn is not None and conn.poll(0))

                wait_until(written_and_answered, 10, "a push written inline and refused, unread")
        finally:
            assert client.close(timeout=1) is False
        assert client.discarded == recorded
        local = client.stats()["local"]
        assert local["staged"] == 0 and local["discarded"] == recorded
    finally:
        stop(proc, grace=20)


def test_an_inline_push_awaiting_its_answer_is_counted_once_by_stats_with_an_older_publisher(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # stats() reads the answer of a push written inline before it takes its local
    # counts: an older publisher, which sends no client_last_push to settle the
    # push, must not see it counted twice either.
    proc = subprocess.Popen([sys.executable, "-c", _OLDER_PUBLISHER, json.dumps(fast_config)])
    try:
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, shipper="inline",
                               ship_batch=20, **fast_config)
        try:
            wait_until(lambda: client.stats()["channel"] is not None, 20, "the older publisher to serve")
            views = []
            for _ in range(10):
                for seq in range(19):
                    client.record_event(eventName="x", seq=seq)

                def awaiting_and_answered() -> bool:
                    client.record_event(eventName="x", seq=-1)  # the batch's push is written inline
                    conn = client._link.conn
                    return bool(client._shipper.awaiting and conn is not None and conn.poll(0))

                wait_until(awaiting_and_answered, 10, "a push written inline and answered, unread")
                stats = client.stats()
                views.append((stats["local"]["recorded"], stats["channel"]["recorded"]))
            assert all(local == chan for local, chan in views), views
        finally:
            client.close()
    finally:
        stop(proc, grace=20)


_FD_REUSE = r"""
import os, signal, sys, threading, time
from samsara_mp import Publisher, SamsaraClient
url, runtime_dir, scratch, mode = sys.argv[1:5]
cfg = dict(url=url, runtime_dir=runtime_dir, channel="t", publish_interval=50, min_buffer_size=1,
           send_client_stats=False, ipc_timeout=3000,
           shipper="inline" if mode == "stats" else "auto")
pub = Publisher(**cfg).start()
try:
    client = SamsaraClient(sourceId="s", start_publishing_thread=False, **cfg)
    client.record_event(eventName="before")
    assert client.flush(timeout=10)
    client.stats()  # the shipper's connection is open
    os.kill(pub.pid, signal.SIGSTOP)
    try:
        shipper, link, end, user = client._shipper, client._link, time.monotonic() + 10, None
        if mode == "stats":  # another application thread waits in stats() on that connection
            user = threading.Thread(target=client.stats)
            user.start()
        while time.monotonic() < end:  # until the connection is in use
            if mode == "push":
                client.record_event(eventName="during")
            time.sleep(0.02)
            if not link.lock.acquire(blocking=False):
                break
            link.lock.release()
        # Whether the woken thread is still alive when close() returns is a race it
        # may win either way: what must hold is that it never touches a file
        # opened after close(), whichever.
        if mode == "push":
            user = shipper.thread
            assert not client.close(timeout=0.3)  # with its push in flight
        else:
            assert client.close(timeout=0.3)
        # The application opens files at once: the lowest free numbers.
        fds = [os.open(os.path.join(scratch, f"f{i}"), os.O_RDWR | os.O_CREAT, 0o600) for i in range(4)]
        for fd in fds:
            os.write(fd, b"APPLICATION DATA " * 64)
            os.lseek(fd, 0, os.SEEK_SET)
        user.join(10)
        print("offsets", [os.lseek(fd, 0, os.SEEK_CUR) for fd in fds], "errors", shipper.thread_errors,
              "alive", user.is_alive())
    finally:
        os.kill(pub.pid, signal.SIGCONT)
finally:
    pub.stop()
"""


@pytest.mark.parametrize(
    "mode", ["push", "stats"], ids=["shipper-thread-in-a-push", "stats-in-another-thread"]
)
def test_close_never_frees_a_descriptor_another_thread_still_uses(
    mode: str, server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    # close(timeout) returns while a thread still waits on the connection: if it
    # closed the socket's descriptor, the next file the application opened would get
    # the number, and that thread would read from it (or write pickled events into it).
    out = subprocess.run(
        [sys.executable, "-c", _FD_REUSE, server.url, runtime_dir, str(tmp_path), mode],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["offsets", "[0,", "0,", "0,", "0]", "errors", "0", "alive", "False"], \
        out.stdout + out.stderr


def test_a_connection_opened_under_a_short_deadline_keeps_the_full_ipc_timeout(
    publisher: Publisher, fast_config: dict[str, Any]
) -> None:
    config = dict(fast_config, ipc_timeout=4_000, shipper="inline")  # only ship() connects
    with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
        _record(client, 5, "short")
        assert client.ship(timeout=0.5)
        conn = client._link.conn
        assert conn is not None and conn.timeout == 4.0  # later calls get it all


def test_sigterm_with_api_down_spools_and_next_publisher_resends_first(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = dict(fast_config, shutdown_timeout=500)
    server.set_online(False)
    pub = Publisher(**config).start()
    try:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 200, "spooled")
            assert client.ship(timeout=10)
            wait_until(lambda: pub.stats()["buffered"] == 200, 10, "buffered events")
        before_stop = pub.stats()
        assert before_stop["recorded"] == 200 and before_stop["buffered"] == 200
    finally:
        assert pub.stop() == 0
    segments = sorted((pub.channel.dir / "spool" / "outage").glob("seg-*.smp"))
    assert segments and sum(p.stat().st_size for p in segments) > 200 * 8
    # A torn tail after the last whole record (a crash mid-write): skipped, counted.
    with open(segments[-1], "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")
    server.set_online(True)
    with Publisher(**config) as second:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 10, "fresh")
            assert client.flush(timeout=30)
        stats = second.stats()
    names = [e["eventName"] for e in server.events()]
    assert names.count("spooled") == 200
    assert names.index("fresh") > max(i for i, n in enumerate(names) if n == "spooled")
    assert _seqs(server, "spooled") == list(range(200))
    assert stats["restored"] == 200 and stats["delivered"] == 210 and stats["spool_corrupt"] == 1
    assert stats["recorded"] == 210 and _balanced(stats)
    assert not list((pub.channel.dir / "spool" / "outage").glob("seg-*.smp"))


def test_publisher_sigkill_under_load_loses_only_what_it_held(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = dict(fast_config, idle_timeout=2_000)
    client = SamsaraClient(sourceId="s", **config)
    try:
        _record(client, 2_000, "load")
        info = wait_until(client.channel.read_info, 10, "a publisher")
        wait_until(lambda: client._shipper.holders.peers, 10, "a push taken")
        os.kill(info["pid"], signal.SIGKILL)
        _record(client, 2_000, "after")
        # What the killed one held may be lost: this flush is not done, and says so once.
        assert client.flush(timeout=30) is False
        assert client.flush(timeout=30)
    finally:
        client.close()
    after = _seqs(server, "after")
    load = _seqs(server, "load")
    assert after == list(range(2_000))
    assert len(load) == len(set(load)) and load == sorted(load)


def test_a_flush_whose_publisher_is_killed_while_it_waits_is_not_done(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    client = SamsaraClient(sourceId="s", **fast_config)
    try:
        _record(client, 1, "warm")
        assert client.flush(timeout=10)  # keeps its flush connection to this publisher
        pid = client.channel.read_info()["pid"]
        server.inject(mode="hang", count=1, hang_seconds=5)
        _record(client, 100, "lost")
        result: dict[str, Any] = {}
        flusher = threading.Thread(target=lambda: result.update(done=client.flush(timeout=10)))
        flusher.start()
        # The publisher is inside the POST of the 100 (the hang taken): the flush waits on it.
        wait_until(lambda: not server.pending_faults(), 10, "the POST to hang")
        os.kill(pid, signal.SIGKILL)
        flusher.join(15)
        assert not flusher.is_alive()
        # The 100 went with the killed publisher: not done, though a new one would answer.
        assert result["done"] is False
        assert _seqs(server, "lost") == []
        _record(client, 10, "after")
        assert client.flush(timeout=10)  # a new publisher: this flush is done
        assert _seqs(server, "after") == list(range(10))
    finally:
        client.close()  # the runtime_dir fixture stops the publisher elected after the kill


def _kill_then_elect(pid: int, other: SamsaraClient) -> None:
    """SIGKILL the publisher ``pid``, and have ``other``'s client elect the next one."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not process_running(pid, None), 10, "the publisher to die")
    _record(other, 1, "other")
    assert other.flush(timeout=10)
    assert other.channel.read_info()["pid"] != pid


def test_a_flush_whose_events_went_with_a_killed_publisher_is_not_done_by_the_next_one(
    server: IngestServer, fast_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = SamsaraClient(sourceId="s", **fast_config)
    other = SamsaraClient(sourceId="o", **fast_config)
    try:
        _record(client, 1, "warm")
        assert client.flush(timeout=10)  # keeps its flush connection to this publisher
        pid = client.channel.read_info()["pid"]
        server.inject(mode="hang", count=1, hang_seconds=5)
        _record(client, 100, "lost")
        link = client._link
        flush_call = link.flush_call

        def killed_first(deadline: float, *args: Any) -> Any:
            # The window no real timing hits reliably: ship() has handed the 100 over
            # (the publisher is in their hung POST), the flush request is not sent yet,
            # and another process's client elects the next publisher meanwhile.
            monkeypatch.setattr(link, "flush_call", flush_call)  # once
            wait_until(lambda: not server.pending_faults(), 10, "the POST to hang")
            _kill_then_elect(pid, other)
            return flush_call(deadline, *args)

        monkeypatch.setattr(link, "flush_call", killed_first)
        assert client.flush(timeout=10) is False  # the new publisher never held the 100
        assert _seqs(server, "lost") == []
        _record(client, 5, "after")
        assert client.flush(timeout=10)  # its own events, held and answered by the new one
    finally:
        other.close()
        client.close()


def test_a_flush_after_the_thread_pushed_to_a_since_killed_publisher_is_not_done(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # The common case: the shipper's thread handed the events over before flush()
    # was called; the publisher holding them is killed and another one elected.
    client = SamsaraClient(sourceId="s", **fast_config)
    other = SamsaraClient(sourceId="o", **fast_config)
    try:
        server.inject(mode="hang", count=1, hang_seconds=5)
        _record(client, 100, "lost")
        wait_until(lambda: not server.pending_faults(), 10, "the thread's push to be in a hung POST")
        pid = client.channel.read_info()["pid"]
        _kill_then_elect(pid, other)
        assert client.flush(timeout=10) is False  # the new publisher never held the 100
        assert _seqs(server, "lost") == []
        _record(client, 5, "after")
        assert client.flush(timeout=10)  # said once: its new events are held and answered
        assert _seqs(server, "after") == list(range(5))
    finally:
        other.close()
        client.close()


def test_events_pushed_while_a_flush_waits_are_not_forgotten_by_it(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # The flush answers for what the publisher held when it asked; events the
    # thread pushes during its wait are the next flush's to answer for.
    client = SamsaraClient(sourceId="s", **fast_config)
    other = SamsaraClient(sourceId="o", **fast_config)
    try:
        _record(client, 1, "warm")
        assert client.flush(timeout=10)
        pid = client.channel.read_info()["pid"]
        server.inject(mode="hang", count=2, hang_seconds=3)  # the POST of "a", then of "b"
        _record(client, 10, "a")
        wait_until(lambda: sum(n for _, n in server.pending_faults()) < 2, 10, "the POST of 'a' to hang")
        acked = client._shipper.holders.pushes_acked
        result: dict[str, Any] = {}
        flusher = threading.Thread(target=lambda: result.update(done=client.flush(timeout=20)))
        flusher.start()
        wait_until(lambda: client._link.flush_conn is not None, 10, "the flush to wait")
        _record(client, 10, "b")
        wait_until(lambda: client._shipper.holders.pushes_acked > acked, 10, "the thread to push 'b'")
        flusher.join(20)
        assert result["done"] is True and sorted(_seqs(server, "a")) == list(range(10))
        wait_until(lambda: not server.pending_faults(), 10, "the POST of 'b' to hang")
        _kill_then_elect(pid, other)
        assert client.flush(timeout=10) is False  # "b" went with the killed publisher
    finally:
        other.close()
        client.close()


def test_a_flush_after_its_publisher_stopped_cleanly_and_another_was_elected_is_done(
    server: IngestServer, fast_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # A restart (the owner stops its publisher, a deploy, an idle exit): the
    # publisher that held this process's events drained them; no alarm.
    pub = Publisher(**fast_config).start()
    try:
        client = SamsaraClient(sourceId="s", **fast_config)
        try:
            wait_until(lambda: client.stats()["channel"] is not None, 20, "the publisher to serve")
            _record(client, 10, "before")
            assert client.ship(timeout=10)
            pub.stop()
            _record(client, 10, "after")
            with caplog.at_level(logging.WARNING, logger="samsara_mp"):
                assert client.flush(timeout=20)
            assert "may be lost" not in caplog.text
            assert client.channel.read_info()["pid"] != pub.pid
            assert sorted(_seqs(server, "before")) == list(range(10))
            assert sorted(_seqs(server, "after")) == list(range(10))
        finally:
            client.close()
    finally:
        pub.stop()


_PLAIN_PUBLISHER = r"""
import json, signal, sys
from samsara_mp.config import Config
from samsara_mp.publisher import PublisherProcess
proc = PublisherProcess(Config.build(env={}, **json.loads(sys.argv[1])))
signal.signal(signal.SIGTERM, proc.request_stop)
sys.exit(proc.run())
"""


def _in_pid_namespace(config: dict[str, Any]) -> subprocess.Popen[bytes]:
    # As in a container: the publisher is pid 1 of its own namespace, and every
    # start of it is pid 1 again; this process sees its real pid.
    return subprocess.Popen(["unshare", "--pid", "--kill-child", sys.executable, "-c",
                             _PLAIN_PUBLISHER, json.dumps(config)])


def test_a_flush_across_a_clean_restart_of_a_publisher_in_its_own_pid_namespace_is_done(
    server: IngestServer, fast_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("unshare --pid needs root (CAP_SYS_ADMIN) here")
    client = SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config)
    procs = [_in_pid_namespace(fast_config)]
    try:
        wait_until(lambda: client.stats()["channel"] is not None, 20, "the first publisher to serve")
        _record(client, 10, "first")
        assert client.ship(timeout=10)
        with open(f"/proc/{procs[0].pid}/task/{procs[0].pid}/children") as f:
            pid = int(f.read().split()[0])  # the publisher, as this process sees it
        assert client.channel.read_info()["pid"] == 1 != pid
        os.kill(pid, signal.SIGTERM)  # a clean stop: it drains, then marks its exit
        procs[0].wait(20)
        procs.append(_in_pid_namespace(fast_config))
        _record(client, 10, "second")
        with caplog.at_level(logging.WARNING, logger="samsara_mp"):
            assert wait_until(lambda: client.flush(timeout=5), 20, "a flush on the second publisher")
        assert "may be lost" not in caplog.text
        assert sorted(_seqs(server, "first")) == list(range(10))
        assert sorted(_seqs(server, "second")) == list(range(10))
    finally:
        client.close()
        for proc in procs:
            stop(proc, grace=20)


_BROKEN_LOOP_PUBLISHER = r"""
import json, signal, sys
import samsara_mp.transport
from samsara_mp.config import Config
from samsara_mp.publisher import PublisherProcess

def post(self, *args, **kwargs):  # a bug in the publish loop: it fails ten times, then exits 1
    raise RuntimeError("injected loop bug")

samsara_mp.transport.Transport.post = post
proc = PublisherProcess(Config.build(env={}, **json.loads(sys.argv[1])))
signal.signal(signal.SIGTERM, proc.request_stop)
sys.exit(proc.run())
"""


def test_a_flush_answered_while_its_publisher_spools_on_the_way_out_is_not_done(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # A publisher whose loop cannot go on spools what it holds and exits 1: what
    # the flush waits for went to the spool, not to the API, though the buffer
    # emptied. Not done.
    proc = subprocess.Popen([sys.executable, "-c", _BROKEN_LOOP_PUBLISHER, json.dumps(fast_config)])
    try:
        client = SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config)
        try:
            wait_until(lambda: client.stats()["channel"] is not None, 20, "the publisher to serve")
            _record(client, 50, "spooled")
            assert client.flush(timeout=20) is False
            assert proc.wait(20) == 1
            assert _seqs(server, "spooled") == []
        finally:
            client.close()
    finally:
        stop(proc, grace=20)


def test_a_pid_reused_by_another_process_is_not_the_publisher_it_was() -> None:
    me = os.getpid()
    start = process_start(me)
    assert start is not None and process_running(me, start) and process_running(me, None)
    assert not process_running(me, start + 1)  # same pid, another start: another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    assert not process_running(child.pid, None)


def test_a_flush_after_its_kept_publisher_was_replaced_reaches_the_new_one(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    client = SamsaraClient(sourceId="s", **fast_config)
    try:
        _record(client, 5, "first")
        assert client.flush(timeout=10)  # keeps its flush connection to this publisher
        pid = client.channel.read_info()["pid"]
        os.kill(pid, signal.SIGTERM)  # a clean stop: it sends what it held first
        wait_until(lambda: (i := client.channel.read_info()) is None or i["pid"] != pid, 15, "it to go")
        _record(client, 5, "second")
        assert client.flush(timeout=15)  # the stale kept connection is not this flush's failure
        assert _seqs(server, "first") == list(range(5)) and _seqs(server, "second") == list(range(5))
    finally:
        client.close()


def _hook_success(count: int, response: Any) -> None:
    with open(os.environ["SMP_HOOK_LOG"], "a") as f:
        f.write(f"success {count} {response.status}\n")


def _hook_failure(count: int, error: Any) -> None:
    with open(os.environ["SMP_HOOK_LOG"], "a") as f:
        f.write(f"failure {count} {str(error).split(':')[0]}\n")


def test_on_success_and_on_failure_hooks_run_in_the_publisher(
    server: IngestServer, fast_config: dict[str, Any], runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = os.path.join(runtime_dir, "hooks.log")
    monkeypatch.setenv("SMP_HOOK_LOG", log)
    pythonpath = os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    config = dict(fast_config, on_success="test_faults:_hook_success", on_failure="test_faults:_hook_failure")
    server.inject(status=503, count=1)
    with Publisher(**config):
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 20)
            assert client.flush(timeout=30)
    with open(log) as f:  # closed: the suite runs clean under -W error::ResourceWarning
        lines = f.read().splitlines()
    assert lines == ["failure 20 HTTP 503", "success 20 202"]


def test_client_stats_events_describe_the_publisher(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = dict(fast_config, send_client_stats=True, stats_interval=200)
    with Publisher(**config):
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 10)
            assert client.flush(timeout=10)
            wait_until(lambda: any(e["eventName"] == "samsara.client.stats" for e in server.events()),
                       10, "a client-stats event")
    stat = next(e for e in server.events() if e["eventName"] == "samsara.client.stats")
    assert stat["maxBufferSize"] == config["max_buffer_size"]
    assert stat["publishInterval"] == config["publish_interval"]
    assert {"buffered", "deliveredDelta", "droppedOverflowDelta", "retriesDelta"} <= set(stat)
