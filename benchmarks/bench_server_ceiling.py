"""The reference Ingestion API server's own ceiling, so we know it is not the bottleneck.

Feeder processes (1 or 2) POST pre-built gzip batches of the benchmark event,
over keep-alive connections, as fast as the server answers, for a bounded
time and count. The server (``store=count``: gunzip, JSON-decode, validate,
count) runs as its own process. Reported: events/s it accepted, and its CPU
seconds per million events.

    python benchmarks/bench_server_ceiling.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import sys
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def build_body(batch: int, variant: int) -> bytes:
    """One gzip JSON array of ``batch`` events encoded as samsara_mp encodes them."""
    ts = int(time.time() * 1000)
    events = [
        json.dumps(
            {"eventName": C.EVENT_NAME, "seq": variant * batch + i, "payload": C.PAYLOAD,
             "timestamp": ts + i, "sourceId": f"feeder{variant}"},
            separators=(",", ":"),
        ).encode()
        for i in range(batch)
    ]
    raw = b"[" + b",".join(events) + b"]"
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    return comp.compress(raw) + comp.flush()


def _feeder(url: str, batch: int, max_posts: int, seconds: float, ready: Any, start: Any, out: Any) -> None:
    bodies = [build_body(batch, v) for v in range(4)]
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "Content-Encoding": "gzip"}
    ready.put(1)
    if not start.wait(600):
        out.put({"posts": 0, "bad": 0})
        return
    deadline = time.monotonic() + seconds
    posts = bad = 0
    while posts < max_posts and time.monotonic() < deadline:
        headers["X-Samsara-publishedTimestamp"] = str(int(time.time() * 1000))
        conn.request("POST", "/v1/events", body=bodies[posts % 4], headers=headers)
        resp = conn.getresponse()
        resp.read()
        bad += resp.status != 202
        posts += 1
    conn.close()
    out.put({"posts": posts, "bad": bad})


def measure_ceiling(srv: C.IngestProcess, batch: int, conns: int, seconds: float,
                    max_events: int) -> dict[str, Any]:
    C.wait_quiet()
    ctx = mp.get_context("fork")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    max_posts = max(1, max_events // (batch * conns))
    procs = [ctx.Process(target=_feeder, args=(srv.url, batch, max_posts, seconds, ready, start, out))
             for _ in range(conns)]
    for p in procs:
        p.start()
        C.track(p.pid, "feeder")
    try:
        for _ in procs:
            ready.get(timeout=30)
        base = srv.accepted()
        cpu0 = C.proc_cpu_seconds(srv.pid)
        t0 = time.time()
        start.set()
        results = [out.get(timeout=seconds + 60) for _ in procs]
        expected = base + sum(r["posts"] for r in results) * batch
        seen, t1 = srv.wait_accepted(expected, 10)
        cpu1 = C.proc_cpu_seconds(srv.pid)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                C.stop_pid(p.pid)
            C.untrack(p.pid)
    n = seen - base
    return {
        "batch": batch, "conns": conns, "events": n, "seconds": t1 - t0,
        "events_per_s": n / (t1 - t0), "server_cpu_s_per_M": (cpu1 - cpu0) / n * 1e6 if n else float("nan"),
        "server_cpu_util": (cpu1 - cpu0) / (t1 - t0), "non_202": sum(r["bad"] for r in results),
    }


def run(srv: C.IngestProcess, quick: bool) -> list[dict[str, Any]]:
    seconds = 1.0 if quick else 3.0
    cap = 300_000 if quick else 2_000_000
    return [measure_ceiling(srv, b, k, seconds, cap) for b in (1000, 5000) for k in (1, 2)]


def print_rows(rows: list[dict[str, Any]]) -> str:
    return C.table(
        ["batch", "feeder procs", "events", "seconds", "events/s", "server CPU s/M ev",
         "server CPU util", "non-202"],
        [[r["batch"], r["conns"], r["events"], r["seconds"], r["events_per_s"],
          r["server_cpu_s_per_M"], r["server_cpu_util"], r["non_202"]] for r in rows],
        title="reference server ceiling (store=count, pre-built gzip batches, keep-alive)",
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    C.install_cleanup()
    C.print_machine()
    srv = C.IngestProcess()
    try:
        rows = run(srv, args.quick)
    finally:
        srv.stop()
    print_rows(rows)
    C.save_json(args.json, {"machine": C.machine_info(), "ceiling": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
