"""The outage spool (overflow="spool", issue #15): what spooling and restoring cost.

    python benchmarks/bench_outage_spool.py [--events 200000] [--json FILE]

Part 1, in this process on the real files of a temporary directory (the
Ring and SegmentSpool of the library, no network):
- push cost per event into a full buffer: drop-oldest (the default) versus
  spooling, with the default fsync policy (every 100 ms or 1 MiB) and, to
  choose that policy, with an fdatasync after every push and with none;
- disk bytes per event;
- restore cost per event: reading batches back from disk and settling them
  (what the publish loop does besides the HTTP request).
Part 2, end to end, one real publisher process and the reference server on
127.0.0.1: record ``--events`` during an outage (server offline) with
``max_buffer_size=5000`` and overflow="spool", then bring the server back and
time the drain; the baseline is the same outage with a buffer big enough to
hold everything in memory (overflow="drop", nothing dropped).
Every loop is bounded in count and in time; the publisher is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from samsara_mp import Publisher, SamsaraClient  # noqa: E402
from samsara_mp import _segment_log as spool  # noqa: E402
from samsara_mp.ingest import IngestServer  # noqa: E402
from samsara_mp.ring import Ring  # noqa: E402

PUSH = 256  # events per push, as a worker's shipper sends them (ship_batch)


def _events(n: int) -> list[bytes]:
    return [json.dumps({"eventName": C.EVENT_NAME, "sourceId": f"w{i % 7}",
                        "timestamp": 1_764_000_000_000 + i, "seq": i, "payload": C.PAYLOAD},
                       separators=(",", ":")).encode()
            for i in range(n)]


def _push_all(buf: Ring, events: list[bytes]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(events), PUSH):
        buf.push(events[i:i + PUSH])
    return time.perf_counter() - t0


def part1(n: int) -> dict[str, Any]:
    events = _events(n)
    raw = sum(map(len, events)) / n
    rows: list[list[Any]] = []
    out: dict[str, Any] = {"event_bytes": raw}
    drop = Ring(5_000)
    t = _push_all(drop, events)
    rows.append(["drop-oldest (default)", t / n * 1e6, "-", "-"])
    out["drop_us"] = t / n * 1e6
    saved = (spool.FSYNC_BYTES, spool.FSYNC_INTERVAL_S)
    policies = [("spool, fsync 100 ms / 1 MiB (default)", saved),
                ("spool, fsync every push", (0, 0.0)),
                ("spool, never fsync", (1 << 62, 1e9))]
    for name, (fbytes, fint) in policies:
        d = tempfile.mkdtemp(prefix="smp-bench-spool-", dir="/tmp")
        try:
            spool.FSYNC_BYTES, spool.FSYNC_INTERVAL_S = fbytes, fint
            seg = spool.SegmentLog(Path(d) / "outage", 1 << 30)
            seg.open()
            buf = Ring(5_000, spool=seg, overflow="spool")
            t = _push_all(buf, events)
            s = buf.snapshot()
            per_disk = s["spool_bytes"] / max(s["spooled"], 1)
            restore_us: Any = "-"
            if fbytes == saved[0]:
                t0 = time.perf_counter()
                got = 0
                for _ in range(10 * n):  # bounded: each round settles a batch
                    if not buf.spool_pending():
                        break
                    batch = buf.take(5_000, 4 << 20)
                    if batch is None:
                        break
                    buf.settle(batch, range(len(batch.payloads)), [])
                    got += len(batch.payloads)
                restore_us = (time.perf_counter() - t0) / max(got, 1) * 1e6
                out["restore_us"] = restore_us
                out["restored"] = got
            rows.append([name, t / n * 1e6, per_disk, restore_us])
            out[name] = {"push_us": t / n * 1e6, "disk_bytes_per_event": per_disk,
                         "spooled": s["spooled"]}
            buf.close_spool()
        finally:
            spool.FSYNC_BYTES, spool.FSYNC_INTERVAL_S = saved
            shutil.rmtree(d, ignore_errors=True)
    C.table(["push into a full buffer", "us/event", "disk bytes/event", "restore us/event"], rows,
            f"Part 1: {n:,} events of {raw:.0f} bytes, pushes of {PUSH}, max_buffer_size 5000")
    return out


def _config(url: str, rundir: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "runtime_dir": rundir, "channel": "spoolbench", "send_client_stats": False,
            "publish_interval": 100, "min_buffer_size": 1, "backoff_base": 10, "backoff_cap": 200,
            "shutdown_timeout": 2_000, "staging_size": 400_000, "staging_bytes": 64 << 20, **extra}


def _run(server: IngestServer, n: int, outage: bool) -> dict[str, Any]:
    rundir = tempfile.mkdtemp(prefix="smp-bench-", dir="/tmp")
    cfg = _config(server.url, rundir, **({"overflow": "spool", "max_buffer_size": 5_000} if outage
                                         else {"max_buffer_size": n + 1_000}))
    server.reset()
    server.set_online(False)  # both runs build a backlog: in memory, or mostly on disk
    pub = Publisher(**cfg).start()
    assert pub.pid is not None
    C.track(pub.pid, "publisher")
    try:
        client = SamsaraClient(sourceId="bench", start_publishing_thread=False, **cfg)
        try:
            t0 = time.perf_counter()
            for i in range(n):
                client.record_event(eventName=C.EVENT_NAME, seq=i, payload=C.PAYLOAD)
                if i % 20_000 == 19_999:
                    client.ship(timeout=30)
            client.ship(timeout=30)
            record_s = time.perf_counter() - t0
            C.wait_until(lambda: pub.stats()["recorded"] == n, 60)
            held = pub.stats()
            cpu0 = C.proc_cpu_seconds(pub.pid)
            t1 = time.perf_counter()
            server.set_online(True)
            done = C.wait_until(lambda: server.event_count() >= n, 120, interval=0.02)
            drain_s = time.perf_counter() - t1
            cpu = C.proc_cpu_seconds(pub.pid) - cpu0
            final = pub.stats()
        finally:
            client.close(timeout=5)
    finally:
        pub.stop()
        C.untrack(pub.pid)
        shutil.rmtree(rundir, ignore_errors=True)
    seqs = [e["seq"] for e in server.events() if e["eventName"] == C.EVENT_NAME]
    return {"outage": outage, "events": n, "record_s": record_s, "drain_s": drain_s,
            "drain_per_s": n / drain_s if done else float("nan"), "publisher_cpu_s": cpu,
            "spooled": held.get("spooled", 0), "spool_bytes": held.get("spool_bytes", 0),
            "delivered": final["delivered"], "in_order_once": seqs == list(range(n))}


def part2(n: int) -> list[dict[str, Any]]:
    server = IngestServer(store="memory")
    server.start()
    try:
        results = []
        for outage in (False, True):
            C.wait_quiet()
            results.append(_run(server, n, outage))
    finally:
        server.stop()
    C.table(["backlog after an outage", "events", "spooled", "spool MB", "drain s", "drain events/s",
             "publisher CPU s", "once, in order"],
            [["on disk (overflow=spool, 5000)" if r["outage"] else "in memory (big max_buffer_size)",
              r["events"], r["spooled"], r["spool_bytes"] / 1e6, r["drain_s"], r["drain_per_s"],
              r["publisher_cpu_s"], r["in_order_once"]] for r in results],
            f"Part 2: {n:,} events, one publisher, reference server on loopback")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    C.install_cleanup()
    C.print_machine()
    C.wait_quiet()
    one = part1(args.events)
    two = part2(args.events)
    C.save_json(args.json, {"machine": C.machine_info(), "part1": one, "part2": two})


if __name__ == "__main__":
    main()
