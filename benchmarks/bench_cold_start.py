"""Cold start: how long until a new channel's first push is accepted, and what a burst keeps.

Every run uses a fresh runtime directory (a cold channel: no publisher, no
authkey) and the library's default configuration, except ``max_buffer_size``
where the burst must fit the shared buffer (200,000, as issue #10's table).

    python benchmarks/bench_cold_start.py [--runs 15] [--processes 64]

Rows:
- first push: ``SamsaraClient(...)`` to the first push the publisher accepted
  (polled from a second connection every 1 ms), median and range;
- the burst table: 4 forked workers x 20,000 from a client made in the parent,
  8 spawned workers x 20,000, 1 spawned worker x 100,000: delivered share;
- N spawned processes starting at once: wall time until all shipped, and how
  many publishers were launched.
All traffic goes to a local reference server on 127.0.0.1; every loop is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from workers import record_many, record_with_inherited  # noqa: E402

from samsara_mp import SamsaraClient  # noqa: E402
from samsara_mp.channel import Channel  # noqa: E402
from samsara_mp.config import Config  # noqa: E402
from samsara_mp.ingest import IngestServer  # noqa: E402


def _config(url: str, rundir: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "runtime_dir": rundir, "channel": "cold", "send_client_stats": False,
            "idle_timeout": 2_000, **extra}


def _stop(rundir: str, url: str) -> None:
    info = Channel(Config.build(env={}, **_config(url, rundir))).read_info()
    if info:
        try:
            os.kill(int(info["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
    shutil.rmtree(rundir, ignore_errors=True)


def first_push(url: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        rundir = tempfile.mkdtemp(prefix="smp-b-", dir="/tmp")
        t0 = time.perf_counter()
        client = SamsaraClient(sourceId="s", **_config(url, rundir))
        client.record_event(eventName="first")
        deadline = time.monotonic() + 30
        conn = None
        while time.monotonic() < deadline:
            try:
                conn = conn or client.channel.connect(1.0)
                if conn.call("stats")["received"] >= 1:
                    break
            except OSError:
                conn = None
            time.sleep(0.001)
        times.append((time.perf_counter() - t0) * 1000)
        if conn is not None:
            conn.close()
        client.close()
        _stop(rundir, url)
    return times


def _join(procs: list[Any]) -> None:
    """Wait for every process (bounded); kill any still running."""
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
            p.join(5)


def _close_after(client: SamsaraClient, worker: int, count: int) -> None:
    record_with_inherited(client, worker, count)
    client.close(timeout=60)


def burst(server: IngestServer, scenario: str) -> tuple[int, int, float]:
    server.reset()
    rundir = tempfile.mkdtemp(prefix="smp-b-", dir="/tmp")
    cfg = _config(server.url, rundir, max_buffer_size=200_000)
    t0 = time.perf_counter()
    parent = None
    if scenario == "4 forked x 20,000 (client made in the parent)":
        parent = SamsaraClient(sourceId="parent", **cfg)
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_close_after, args=(parent, w, 20_000)) for w in range(4)]
        expected = 80_000
    elif scenario == "8 spawned x 20,000":
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=record_many, args=(cfg, w, 20_000)) for w in range(8)]
        expected = 160_000
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=record_many, args=(cfg, 0, 100_000))]
        expected = 100_000
    for p in procs:
        p.start()
    _join(procs)
    server.wait_for_events(expected, 60)
    wall = time.perf_counter() - t0
    got = server.event_count()
    if parent is not None:
        parent.close()
    _stop(rundir, server.url)
    return got, expected, wall


def _ship_on(cfg: dict[str, Any], worker: int, start: Any) -> None:
    start.wait(60)
    record_many(cfg, worker, 100)


def many(server: IngestServer, n: int) -> tuple[float, int, int]:
    server.reset()
    rundir = tempfile.mkdtemp(prefix="smp-b-", dir="/tmp")
    cfg = _config(server.url, rundir, publish_interval=100, min_buffer_size=1)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_ship_on, args=(cfg, w, start)) for w in range(n)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let the interpreters come up, so the start is simultaneous
    t0 = time.perf_counter()
    start.set()
    _join(procs)
    server.wait_for_events(n * 100, 60)
    wall = time.perf_counter() - t0
    pids: set[int] = set()
    for path in glob.glob(os.path.join(rundir, "*", "publisher.log")):
        pids |= {int(x) for x in re.findall(r"publisher\[(\d+)\]", Path(path).read_text())}
    got = server.event_count()
    _stop(rundir, server.url)
    return wall, len(pids), got


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--processes", type=int, default=64)
    args = ap.parse_args()
    with IngestServer(store="memory") as server:
        times = first_push(server.url, args.runs)
        print(f"first push accepted after SamsaraClient(): median {statistics.median(times):.0f} ms, "
              f"range {min(times):.0f}-{max(times):.0f} ms over {len(times)} cold channels")
        for scenario in ("4 forked x 20,000 (client made in the parent)", "8 spawned x 20,000",
                         "1 spawned x 100,000"):
            got, expected, wall = burst(server, scenario)
            print(f"{scenario}: delivered {got:,}/{expected:,} ({100 * got / expected:.1f}%) in {wall:.1f} s")
        wall, launched, got = many(server, args.processes)
        print(f"{args.processes} spawned processes at once on a cold channel: all shipped and delivered "
              f"in {wall:.1f} s, {launched} publisher(s) launched, {got:,} events delivered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
