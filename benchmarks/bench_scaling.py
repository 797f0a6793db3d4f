"""Cost versus event size and batch size, and the publisher's memory per buffered event.

A. For events of about 100 B, 1 KiB and 10 KiB (encoded size; the payload is
   random letters from a pool, so gzip sees realistic-ish, not constant,
   text): record_event latency in one process (publisher healthy), and the
   end-to-end run of bench_throughput.py with 2 workers: events/s, MB/s,
   CPU µs per event for workers, publisher and server, gzip ratio.
C. Batch size: the same end-to-end run with 100 B events and
   ``max_batch_size`` from 100 to 20,000: events/s, requests, publisher and
   server CPU µs per event, gzip ratio.
B. Memory per buffered event: with the reference server offline (503 to
   every POST, so the publisher retries and keeps everything), push K events
   of each size into a fresh publisher and compare its VmRSS before/after.

    python benchmarks/bench_scaling.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_throughput as BT  # noqa: E402

from samsara_mp import Publisher, SamsaraClient  # noqa: E402

SIZES = (100, 1024, 10 * 1024)
BATCHES = (100, 500, 2_000, 5_000, 20_000)


def payload_pool(size: int, kind: str = "words", pool: int = 256) -> list[str]:
    """Payloads making the encoded benchmark event about ``size`` bytes long.

    ``words``: random words from a 512-word vocabulary (gzip ~0.3, like text
    or ids); ``random``: random letters and digits (gzip ~0.75, the worst case
    for the publisher's compression).
    """
    base = len(json.dumps({"eventName": C.EVENT_NAME, "seq": 123456, "payload": "",
                           "timestamp": 1795433326379, "sourceId": "w1"}, separators=(",", ":")))
    n = max(1, size - base)
    rnd = random.Random(size)
    if kind == "random":
        letters = string.ascii_letters + string.digits
        return ["".join(rnd.choices(letters, k=n)) for _ in range(pool)]
    vocab = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(3, 10))) for _ in range(512)]
    out = []
    for _ in range(pool):
        text = " ".join(rnd.choices(vocab, k=n // 4 + 2))
        out.append(text[:n])
    return out


def w_sized(idx: int, count: int, opts: dict[str, Any], ready: Any, start: Any, out: Any) -> None:
    c = SamsaraClient(url=opts["url"], sourceId=f"w{idx}", channel=opts["channel"],
                      runtime_dir=opts["rundir"], staging_size=opts["staging"])
    rec = c.record_event
    pool = opts["pool"]
    k = len(pool)
    cpu0 = C.self_cpu_seconds()
    ready.put(idx)
    if not start.wait(600):
        return
    t0 = time.time()
    for i in range(count):
        rec(eventName=C.EVENT_NAME, seq=i, payload=pool[i % k])
    t1 = time.time()
    shipped = c.close(60.0)
    out.put({"idx": idx, "t0": t0, "t_rec": t1, "t_done": time.time(),
             "cpu": C.self_cpu_seconds() - cpu0, "ok": shipped, "dropped": c._staging.dropped})


def record_latency(srv: C.IngestProcess, rundir: str, pool: list[str], n: int) -> dict[str, float]:
    pub = Publisher(url=srv.url, channel="sc-lat", runtime_dir=rundir, publish_interval=100,
                    min_buffer_size=1, max_buffer_size=2_000_000).start()
    assert pub.pid is not None
    C.track(pub.pid, "publisher")
    try:
        c = SamsaraClient(url=srv.url, sourceId="w1", channel="sc-lat", runtime_dir=rundir,
                          staging_size=max(n, 10_000))
        rec, pc, k = c.record_event, time.perf_counter_ns, len(pool)
        lat = [0] * n
        C.wait_quiet()
        for i in range(n):
            t0 = pc()
            rec(eventName=C.EVENT_NAME, seq=i, payload=pool[i % k])
            lat[i] = pc() - t0
        c.close(30.0)
    finally:
        pub.stop()
        C.untrack(pub.pid)
    lat.sort()
    return {"p50_us": C.percentile(lat, 50) / 1000, "p99_us": C.percentile(lat, 99) / 1000,
            "mean_us": sum(lat) / n / 1000}


def end_to_end(
    srv: C.IngestProcess, rundir: str, pool: list[str], total: int, workers: int, batch: int = 5_000
) -> dict[str, Any]:
    channel = f"sc-e2e-{len(pool[0])}-{batch}"
    pub = Publisher(url=srv.url, channel=channel, runtime_dir=rundir, publish_interval=100,
                    min_buffer_size=1, max_buffer_size=2_000_000, max_batch_size=batch).start()
    assert pub.pid is not None
    C.track(pub.pid, "publisher")
    try:
        per = total // workers
        opts = {"url": srv.url, "channel": channel, "rundir": rundir, "staging": per, "pool": pool}
        s0 = C.proc_cpu_seconds(srv.pid)  # run_workers waits for a quiet machine itself
        r = BT.run_workers(w_sized, workers, per, opts, srv, max(60.0, total / 5_000),
                           lambda: C.proc_cpu_seconds(pub.pid))  # type: ignore[arg-type]
        r["server_cpu_us"] = (C.proc_cpu_seconds(srv.pid) - s0) / r["events"] * 1e6
        st = pub.stats()
        r["raw_bytes"], r["sent_bytes"] = st["bytes_raw"], st["bytes_sent"]
        r["requests"] = st["requests"]
        r["drops"] = st["dropped_overflow"] + st["rejected"]
        r["pub_peak_rss_mb"] = C.proc_status_kb(pub.pid, "VmHWM") / 1024
    finally:
        pub.stop()
        C.untrack(pub.pid)
    return r


def memory_per_event(srv: C.IngestProcess, rundir: str, pool: list[str], k: int) -> dict[str, Any]:
    channel = f"sc-mem-{len(pool[0])}"
    pub = Publisher(url=srv.url, channel=channel, runtime_dir=rundir, publish_interval=100,
                    min_buffer_size=1, max_buffer_size=2_000_000, backoff_cap=2_000).start()
    assert pub.pid is not None
    C.track(pub.pid, "publisher")
    srv.set_online(False)
    try:
        C.wait_quiet()
        before = C.proc_status_kb(pub.pid, "VmRSS")
        c = SamsaraClient(url=srv.url, sourceId="w1", channel=channel, runtime_dir=rundir,
                          staging_size=k)
        n = len(pool)
        for i in range(k):
            c.record_event(eventName=C.EVENT_NAME, seq=i, payload=pool[i % n])
        c.close(60.0)
        ok = C.wait_until(lambda: pub.stats()["buffered"] >= k, 60, 0.05)
        time.sleep(1.0)  # let at least one retry (peek, join, gzip of a batch) happen
        st = pub.stats()
        after = C.proc_status_kb(pub.pid, "VmRSS")
        hwm = C.proc_status_kb(pub.pid, "VmHWM")
    finally:
        srv.set_online(True)
        pub.stop()
        C.untrack(pub.pid)
    per = (after - before) * 1024 / k
    avg = st["buffered_bytes"] / max(st["buffered"], 1)
    return {"events": k, "buffered": st["buffered"], "complete": bool(ok),
            "event_bytes": avg, "rss_before_mb": before / 1024, "rss_after_mb": after / 1024,
            "hwm_mb": hwm / 1024, "bytes_per_event": per, "overhead_per_event": per - avg,
            "failed_attempts": st["failed_attempts"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--payload", choices=("words", "random"), default="words",
                    help="payload text: words (gzip ~0.3) or random letters (gzip ~0.75)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--encoder", choices=("auto", "json", "orjson"), default="auto",
                    help="samsara_mp's event encoder: the library's choice, or force one")
    args = ap.parse_args()
    print(f"samsara_mp event encoder: {C.select_encoder(args.encoder)}")
    C.install_cleanup()
    C.print_machine()
    scale = 5 if args.quick else 1
    counts = {100: 200_000 // scale, 1024: 100_000 // scale, 10 * 1024: 20_000 // scale}
    rundir = tempfile.mkdtemp(prefix="bs-", dir="/tmp")
    cost_rows, batch_rows, mem_rows = [], [], []
    srv = C.IngestProcess()
    try:
        for size in SIZES:
            pool = payload_pool(size, args.payload)
            lat = record_latency(srv, rundir, pool, min(counts[size], 50_000))
            e2e = end_to_end(srv, rundir, pool, counts[size], args.workers)
            cost_rows.append({"size": size, **lat, **{k: v for k, v in e2e.items() if k != "errors"}})
        pool = payload_pool(100, args.payload)
        for batch in BATCHES:
            e2e = end_to_end(srv, rundir, pool, counts[100], args.workers, batch)
            batch_rows.append({"batch": batch, **{k: v for k, v in e2e.items() if k != "errors"}})
        for size in SIZES:
            pool = payload_pool(size, args.payload)
            mem_rows.append({"size": size, **memory_per_event(srv, rundir, pool, counts[size])})
    finally:
        srv.stop()

    C.table(
        ["event size", "record p50 µs", "record p99 µs", f"e2e events ({args.workers} workers)",
         "delivered", "events/s", "raw MB/s", "worker CPU µs/ev", "publisher CPU µs/ev",
         "server CPU µs/ev", "gzip ratio", "pub peak RSS MB"],
        [[f"{r['size']:,} B", r["p50_us"], r["p99_us"], r["events"], r["delivered"], r["events_per_s"],
          r["raw_bytes"] / r["wall_s"] / 1e6, r["worker_cpu_s_per_M"], r["helper_cpu_s_per_M"],
          r["server_cpu_us"], r["sent_bytes"] / max(r["raw_bytes"], 1), r["pub_peak_rss_mb"]]
         for r in cost_rows],
        title=f"cost versus event size (publisher healthy, payload: {args.payload})",
    )
    C.table(
        ["max_batch_size", f"e2e events ({args.workers} workers)", "delivered", "requests", "events/s",
         "worker CPU µs/ev", "publisher CPU µs/ev", "server CPU µs/ev", "gzip ratio", "pub peak RSS MB"],
        [[r["batch"], r["events"], r["delivered"], r["requests"], r["events_per_s"],
          r["worker_cpu_s_per_M"], r["helper_cpu_s_per_M"], r["server_cpu_us"],
          r["sent_bytes"] / max(r["raw_bytes"], 1), r["pub_peak_rss_mb"]]
         for r in batch_rows],
        title=f"cost versus batch size (100 B events, payload: {args.payload})",
    )
    C.table(
        ["event size", "events buffered", "avg encoded bytes", "VmRSS before MB", "VmRSS after MB",
         "VmHWM MB", "RSS bytes / event", "overhead bytes / event", "failed POSTs meanwhile"],
        [[f"{r['size']:,} B", r["buffered"], r["event_bytes"], r["rss_before_mb"], r["rss_after_mb"],
          r["hwm_mb"], r["bytes_per_event"], r["overhead_per_event"], r["failed_attempts"]]
         for r in mem_rows],
        title="publisher memory per buffered event (server offline: 503, events kept)",
    )
    C.save_json(args.json, {"machine": C.machine_info(), "cost": cost_rows, "batch": batch_rows,
                            "memory": mem_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
