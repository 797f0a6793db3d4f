"""A cold channel: the first clients elect and start the publisher, and nothing is lost meanwhile.

Every test here runs at the default staging bounds with no publisher running
when the workers begin, which is where a burst used to lose events: staging
held 10,000 events while a publisher took 300-1,000 ms to come up.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from procs import alive
from workers import record_many, record_with_inherited

from samsara_mp import Publisher, SamsaraClient
from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cold_config(server: IngestServer, runtime_dir: str) -> dict[str, Any]:
    """Defaults everywhere but where the test needs to see the end: a buffer the
    burst fits in, a publisher that leaves soon after, no stats events."""
    return {
        "url": server.url,
        "runtime_dir": runtime_dir,
        "channel": "cold",
        "max_buffer_size": 200_000,
        "idle_timeout": 2_000,
        "send_client_stats": False,
    }


def _publisher_pids(runtime_dir: str) -> set[int]:
    """Every publisher process that ever wrote to the channel's log (winners and losers)."""
    pids: set[int] = set()
    for path in glob.glob(os.path.join(runtime_dir, "*", "publisher.log")):
        pids |= {int(p) for p in re.findall(r"publisher\[(\d+)\]", Path(path).read_text())}
    return pids


def _stop_publisher(channel: Channel) -> None:
    info = channel.read_info()
    if info is None:
        return
    pid = int(info["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_until(lambda: not alive(pid), 20, f"publisher {pid} to stop")


def _assert_all_in_order(events: list[dict[str, Any]], workers: int, count: int) -> None:
    seqs: dict[int, list[int]] = defaultdict(list)
    for event in events:
        seqs[event["worker"]].append(event["seq"])
    assert sorted(seqs) == list(range(workers))
    for worker, got in seqs.items():
        assert got == list(range(count)), f"worker {worker}: {len(got)} events, out of order or lost"


def _run(procs: list[Any]) -> None:
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def test_four_forked_workers_burst_on_a_cold_channel_and_lose_nothing(
    server: IngestServer, cold_config: dict[str, Any]
) -> None:
    # The client is made in the parent, as gunicorn's preload_app and a Pool's parent do.
    parent = SamsaraClient(sourceId="parent", **cold_config)
    try:
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_close_after, args=(parent, w, 20_000)) for w in range(4)]
        _run(procs)
        assert server.wait_for_events(80_000, 60), server.event_count()
        _assert_all_in_order(server.events(), 4, 20_000)
        assert parent.flush(timeout=30)
        chan = parent.stats()["channel"]
        assert chan["recorded"] == chan["delivered"] == 80_000
        assert chan["dropped_overflow"] == chan["rejected"] == chan["buffered"] == chan["staged"] == 0
    finally:
        parent.close()
        _stop_publisher(parent.channel)


def _close_after(client: SamsaraClient, worker: int, count: int) -> None:
    record_with_inherited(client, worker, count)
    if not client.close(timeout=30):
        raise SystemExit(f"worker {worker} could not ship")


def test_one_worker_records_100k_back_to_back_on_a_cold_channel(
    server: IngestServer, cold_config: dict[str, Any]
) -> None:
    ctx = multiprocessing.get_context("spawn")
    _run([ctx.Process(target=record_many, args=(cold_config, 0, 100_000))])
    assert server.wait_for_events(100_000, 60), server.event_count()
    _assert_all_in_order(server.events(), 1, 100_000)
    _stop_publisher(Channel(Config.build(env={}, **cold_config)))


def test_sixteen_processes_starting_at_once_launch_at_most_two_publishers(
    server: IngestServer, cold_config: dict[str, Any], runtime_dir: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_record_on_signal, args=(cold_config, w, 500, start)) for w in range(16)]
    for p in procs:
        p.start()
    try:
        wait_until(lambda: all(p.pid for p in procs), 10, "processes to start")
        start.set()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * 16
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert server.wait_for_events(16 * 500, 60), server.event_count()
    _assert_all_in_order(server.events(), 16, 500)
    launched = _publisher_pids(runtime_dir)
    assert 1 <= len(launched) <= 2, f"{len(launched)} publishers launched: {sorted(launched)}"
    _stop_publisher(Channel(Config.build(env={}, **cold_config)))


def _record_on_signal(config: dict[str, Any], worker: int, count: int, start: Any) -> None:
    start.wait(30)
    record_many(config, worker, count)


def test_a_client_starts_the_election_when_made_without_starting_a_thread(
    cold_config: dict[str, Any],
) -> None:
    before = threading.active_count()
    client = SamsaraClient(sourceId="s", **cold_config)
    try:
        assert threading.active_count() == before, [t.name for t in threading.enumerate()]
        # Nothing recorded, nothing shipped: the publisher comes up all the same.
        assert client.channel.wait_connectable(15)
        assert threading.active_count() == before, [t.name for t in threading.enumerate()]
        client.record_event(eventName="first")
        assert any(t.name == "samsara-mp-shipper" for t in threading.enumerate())
        assert client.flush(timeout=10)
    finally:
        client.close()
        _stop_publisher(client.channel)


_FORK_AFTER_CLIENT = """
import os, sys, threading, warnings
warnings.simplefilter("error", DeprecationWarning)
from samsara_mp import Publisher, SamsaraClient
owner = Publisher(url=sys.argv[1], runtime_dir=sys.argv[2], channel="fw").start()
client = SamsaraClient(url=sys.argv[1], runtime_dir=sys.argv[2], channel="fw", sourceId="s")
assert threading.active_count() == 1, [t.name for t in threading.enumerate()]
pid = os.fork()  # raises under -W error on 3.12+ if this process had a thread
if pid == 0:
    client.record_event(eventName="from.child")
    os._exit(0 if client.close(timeout=10) else 1)
_, status = os.waitpid(pid, 0)
code = owner.stop()
sys.exit(0 if status == 0 and code == 0 else 1)
"""


def test_an_owner_and_a_client_that_recorded_nothing_fork_without_threads(
    server: IngestServer, runtime_dir: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", textwrap.dedent(_FORK_AFTER_CLIENT),
         server.url, runtime_dir],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr
    assert server.wait_for_events(1, 10)
    assert [e["eventName"] for e in server.events()] == ["from.child"]


# ---- inline shipping never waits on the publisher ----
def _inline_under_stopped_publisher(config: dict[str, Any], pid: int, out: Any) -> None:
    client = SamsaraClient(sourceId="inline", shipper="inline", start_publishing_thread=False, **config)
    for seq in range(300):
        client.record_event(eventName="warm", seq=seq)
    client.ship(timeout=10)
    os.kill(pid, signal.SIGSTOP)
    worst = 0.0
    try:
        for seq in range(3_000):
            started = time.perf_counter()
            client.record_event(eventName="stopped", seq=seq)
            worst = max(worst, time.perf_counter() - started)
            if seq % 300 == 0:
                time.sleep(0.05)  # let the connection backoff run out, so later calls try again
    finally:
        os.kill(pid, signal.SIGCONT)
    shipped = client.close(timeout=20)
    out.put((worst, shipped))


def test_inline_record_event_does_not_wait_for_a_stopped_publisher(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = dict(fast_config, ipc_timeout=3_000)  # a wait on the publisher would take 3 s
    with Publisher(**config) as pub:
        assert pub.pid is not None
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=_inline_under_stopped_publisher, args=(config, pub.pid, out))
        proc.start()
        try:
            worst, shipped = out.get(timeout=120)
            proc.join(30)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            os.kill(pub.pid, signal.SIGCONT)
        assert shipped
        # The IPC timeout is 3 s; a call that waited on the publisher would show it.
        assert worst < 0.5, f"record_event took {worst * 1000:.1f} ms with the publisher stopped"
        assert server.wait_for_events(3_300, 30), server.event_count()
        seqs = [e["seq"] for e in server.events() if e["eventName"] == "stopped"]
        assert seqs == list(range(3_000))


# ---- a replaced publisher, and what close gives up ----
def test_stats_and_flush_reconnect_once_to_a_replaced_publisher(
    fast_config: dict[str, Any],
) -> None:
    client = SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config)
    try:
        with Publisher(**fast_config) as first:
            assert client.stats()["channel"]["publisher_pid"] == first.pid
        with Publisher(**fast_config) as second:
            result = client.stats()  # the cached connection is to the first, now gone
            assert result["channel"] is not None, result.get("error")
            assert result["channel"]["publisher_pid"] == second.pid
            client.record_event(eventName="after")
            assert client.flush(timeout=10)
        with Publisher(**fast_config):
            assert client.flush(timeout=10)
            client.record_event(eventName="after")
            assert client.flush(None)  # the default timeout, as close(None) takes its own
    finally:
        client.close()


_EXIT_WITHOUT_PUBLISHER = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from samsara_mp import SamsaraClient
client = SamsaraClient(url=sys.argv[1], runtime_dir=sys.argv[2], channel="gone", sourceId="s",
                       start_publishing_thread=False, exit_timeout=200)
for i in range(7):
    client.record_event(eventName="lost", i=i)
"""


def test_events_given_up_at_exit_are_logged_with_their_number(runtime_dir: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_EXIT_WITHOUT_PUBLISHER), "http://127.0.0.1:9/",
         runtime_dir],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stderr and "7 staged events discarded" in proc.stderr, proc.stderr


def test_staging_is_bounded_in_bytes_and_counts_what_it_drops(runtime_dir: str) -> None:
    client = SamsaraClient(url="http://127.0.0.1:9/", sourceId="s", runtime_dir=runtime_dir,
                           start_publishing_thread=False, staging_bytes=100_000, shipper="inline")
    try:
        for i in range(5_000):
            client.record_event(eventName="e", i=i, pad="x" * 60)
        local = client.stats()["local"]
        assert local["staged_bytes"] <= 100_000
        assert local["staged"] + local["dropped_staging"] == local["recorded"] == 5_000
        assert local["dropped_staging"] > 0
    finally:
        client.close(timeout=0.1)


_POOL_PUBLISHER_FORK = """
import multiprocessing, sys, warnings
warnings.simplefilter("error", DeprecationWarning)  # 3.12+: fork() in a multi-threaded process
from samsara_mp import get_client
from samsara_mp.integrations.multiprocessing import PoolPublisher

def work(n):
    get_client().record_event(eventName="pp.task", n=n)
    return n

if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    with PoolPublisher(url=sys.argv[1], runtime_dir=sys.argv[2], channel="pp", sourceId="pp",
                       publish_interval=50, min_buffer_size=1, send_client_stats=False) as pub:
        with ctx.Pool(2, **pub.pool_kwargs()) as pool:
            assert pool.map(work, range(50)) == list(range(50))
"""


def test_a_pool_publisher_parent_forks_its_pool_without_a_samsara_thread(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    script = tmp_path / "pp.py"
    script.write_text(_POOL_PUBLISHER_FORK)
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", str(script), server.url, runtime_dir],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeprecationWarning" not in proc.stderr, proc.stderr[-3000:]
    assert server.wait_for_events(50, 30), server.event_count()


def test_whoever_can_connect_to_a_new_publisher_can_find_its_pid(cold_config: dict[str, Any]) -> None:
    # publisher.json (its pid) is written before the socket listens: a process that
    # connected and then stops the channel by pid (tests, benchmarks, operators)
    # never finds it missing and leaves the publisher running unseen.
    cfg = Config.build(env={}, **dict(cold_config, channel="pidfirst"))
    channel = Channel(cfg)
    launch, proc = channel.launch_publisher()
    assert proc is not None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(channel.socket_path):
            assert time.monotonic() < deadline, "the publisher never listened"
            time.sleep(0.0002)
        info = channel.read_info()
        assert info is not None and int(info["pid"]) == proc.pid
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: not alive(proc.pid), 20, "the publisher to stop")


def test_a_new_publisher_imports_nothing_it_does_not_need_before_it_serves() -> None:
    # Not a timing: the modules that made a new publisher's start slow (each measured
    # at 4-13 ms on this project's VM, benchmarks/README.md "Cold start") stay out of
    # what it imports before its socket listens. -S keeps site's own imports out of it.
    # hashlib is not among them: the handshake's BLAKE2b comes from it, and it is imported
    # with the IPC on purpose (a first import after OpenSSL's cleanup at exit would crash).
    late = ("dataclasses", "inspect", "argparse", "requests", "concurrent.futures",
            "samsara_mp.metrics", "prometheus_client")
    probe = ("import sys; import samsara_mp.publisher; "
             f"print(' '.join(m for m in {late!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    assert proc.stdout.split() == [], proc.stdout
    # With site (where the fast extra's isal is importable), ISA-L waits for the first batch.
    with_site = ("import sys; import samsara_mp.publisher; "
                 "print(sorted(m for m in ('isal', 'orjson') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", with_site], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    assert proc.stdout.split() == ["[]"], proc.stdout


@pytest.mark.parametrize(("argv", "said"), [
    ([], "--config-fd is required"),
    (["--config-fd"], "--config-fd needs an integer"),
    (["--config-fd", "x"], "--config-fd needs an integer"),
    (["--config-fd", "3", "--url", "http://u:p@h/"], "unknown argument: --url"),
    (["--config-fd=3", "--url=http://u:p@h/"], "unknown argument: --url"),
])
def test_the_publisher_command_line_says_what_is_wrong(argv: list[str], said: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "samsara_mp.publisher", *argv], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0
    assert said in proc.stderr and "usage: python -m samsara_mp.publisher" in proc.stderr, proc.stderr
    assert "u:p" not in proc.stderr  # an argument's value is never echoed (it may be a secret)
