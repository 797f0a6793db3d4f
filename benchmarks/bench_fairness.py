"""Fairness under a slow API: one fast worker and slow ones, at the default configuration.

One ``SamsaraClient(url=..., channel=..., runtime_dir=...)`` is made in the
parent (it launches the channel's publisher), then 1 + ``--slow`` workers are
forked and record through the inherited client, as a preforked app's do:
worker 0 at ``--fast-rate`` events/s (0: as fast as it can), the others at
``--slow-rate`` each, all for ``--duration`` seconds from one start signal.
The API is slower than the producers: the reference server (``store=memory``,
its own process) answers every event POST only after ``--latency`` seconds
(an injected fault rule with ``status: null``, ``POST /_test/faults``), so
with the default ``max_batch_size`` (5,000) it takes at most
5,000 / latency events/s from the one publisher.

After its recording each worker calls ``flush(timeout=...)`` bounded by the
run's common end (start + duration + ``--drain``), reads its own counters
(``stats()["local"]``: dropped_staging, staged), then ``close(timeout=1)``
(what it still holds then is discarded and counted: ``discarded``) and
reports. Once all reported (the cut), the parent reads every event the
server accepted and the channel's accounting from the publisher
(``stats()["channel"]`` of a probe client: dropped_buffer, dropped_staging,
buffered, ...), and reports per worker: recorded, delivered at the cut
(distinct seq) and its share, the worker's staging drops, what it still held
after its flush and discarded at close; duplicates and order. The ring's
``buffered`` at the cut is in flight, not delivered (the publisher sends it
when it is stopped: the server's count after that is printed too).

Loopback only; every loop is bounded in count and in time; every process
started (server, workers, publisher) is stopped by its pid.

    python benchmarks/bench_fairness.py [--slow 3] [--fast-rate 20000] [--slow-rate 200]
        [--duration 20] [--latency 1.0] [--drain 10] [--repeat 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_burst_defaults import PUB_KEYS, Reports, _send, clean_environment, stray_pids  # noqa: E402

from samsara_mp import SamsaraClient  # noqa: E402

EVENT = "bench.fair"
READY_TIMEOUT = 60.0
QUIET_S = 3.0
POLL_S = 0.1


def worker(idx: int, rate: float, spec: dict[str, Any], report_fd: int, start_fd: int,
           client: SamsaraClient) -> None:
    _send(report_fd, {"ready": idx})
    if not select.select([start_fd], [], [], READY_TIMEOUT + 30)[0]:
        return
    os.read(start_fd, 1)
    t0 = time.time()
    stop_at, end_at = t0 + spec["duration"], t0 + spec["duration"] + spec["drain"]
    rec = client.record_event
    src = f"w{idx}"
    cpu0 = C.self_cpu_seconds()
    i = 0
    step = 1024 if rate <= 0 else max(1, int(rate // 100))  # check the clock ~100 times a second
    while True:
        now = time.time()
        if now >= stop_at:
            break
        if rate > 0:
            ahead = t0 + i / rate - now
            if ahead > 0:
                time.sleep(min(ahead, stop_at - now))
                continue
        for _ in range(step):
            rec(eventName=EVENT, sourceId=src, seq=i, wk=idx)
            i += 1
    t_rec = time.time()
    flushed = client.flush(timeout=max(end_at - time.time(), 0.1))
    t_flush = time.time()
    st = client.stats().get("local") or {}
    closed = client.close(timeout=1.0)
    _send(report_fd, {"idx": idx, "recorded": i, "t0": t0, "t_rec": t_rec, "t_flush": t_flush,
                      "flush": flushed, "close": closed, "cpu": C.self_cpu_seconds() - cpu0,
                      "dropped_staging": st.get("dropped_staging"), "staged_after_flush": st.get("staged"),
                      "local_recorded": st.get("recorded"), "discarded": client.discarded})


def fork_worker(idx: int, rate: float, spec: dict[str, Any], fds: dict[str, int],
                client: SamsaraClient) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            C.forget_in_child()
            os.close(fds["start_w"])
            os.close(fds["report_r"])
            worker(idx, rate, spec, fds["report_w"], fds["start_r"], client)
            code = 0
        except BaseException:  # noqa: BLE001 - a worker's failure is printed, then it ends
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return C.track(pid, "worker")


def run_once(args: argparse.Namespace, tmp: str, run_no: int) -> dict[str, Any]:
    C.wait_quiet()
    rates = [args.fast_rate] + [args.slow_rate] * args.slow
    n = len(rates)
    sink = C.IngestProcess(store="memory")
    status, body = sink.admin.request("POST", "/_test/faults",
                                      {"status": None, "latency": args.latency, "count": 1_000_000})
    if status != 200:
        sink.stop()
        raise RuntimeError(f"POST /_test/faults answered {status}: {body}")
    channel = f"fair{run_no}-{os.getpid()}"
    rundir = tempfile.mkdtemp(prefix=f"fair{run_no}-", dir=tmp)
    report_r, report_w = os.pipe()
    start_r, start_w = os.pipe()
    fds = {"report_r": report_r, "report_w": report_w, "start_r": start_r, "start_w": start_w}
    pids: list[int] = []
    pub_pid: int | None = None
    parent: SamsaraClient | None = None
    results: list[dict[str, Any]] = []
    at_cut: list[dict[str, Any]] = []
    r: dict[str, Any] = {"run": run_no, "rates": rates, "duration": args.duration, "drain": args.drain,
                         "latency": args.latency}
    try:
        parent = SamsaraClient(url=sink.url, channel=channel, runtime_dir=rundir)
        spec = {"duration": args.duration, "drain": args.drain}
        for i, rate in enumerate(rates):
            pids.append(fork_worker(i, rate, spec, fds, parent))
        os.close(fds.pop("report_w"))
        os.close(fds.pop("start_r"))
        reports = Reports(report_r)
        ready: set[int] = set()
        t_ready = time.monotonic() + READY_TIMEOUT
        while len(ready) < n and time.monotonic() < t_ready and not reports.eof:
            ready.update(m["ready"] for m in reports.read(0.5) if "ready" in m)
        if len(ready) < n:
            raise RuntimeError(f"only {len(ready)} of {n} workers were ready within {READY_TIMEOUT:.0f} s")
        t_start = time.time()
        os.close(fds.pop("start_w"))
        deadline = time.monotonic() + args.duration + args.drain + 15.0
        while len(results) < n and time.monotonic() < deadline and not reports.eof:
            results.extend(m for m in reports.read(POLL_S) if "idx" in m)
        # The cut: every worker has flushed (bounded), closed and reported, or the deadline
        # passed. What the server holds now is "delivered at the cut"; the channel's
        # accounting is read now too, so what it still buffers is in flight, not delivered.
        at_cut = sink.events()
        pub_pid, r["publisher"] = C.channel_accounting(sink.url, channel, rundir, PUB_KEYS)
        r["t_cut"] = time.time() - t_start
        r["timed_out"] = time.monotonic() >= deadline
    finally:
        for p in pids:
            C.wait_until(lambda p=p: not C.pid_alive(p), timeout=2.0)
            C.stop_pid(p, grace=2.0)
        for fd in fds.values():
            os.close(fd)
        if parent is not None:
            parent.close(timeout=1.0)
        if pub_pid is not None:
            C.stop_pid(pub_pid, grace=5.0)
        for p in stray_pids(rundir, {os.getpid(), sink.pid}):
            r.setdefault("stray_pids", []).append(p)
            C.stop_pid(p, grace=5.0)
    try:
        delivered_at_stop = sink.accepted()  # after the publisher was stopped (it sends what it buffers)
    finally:
        sink.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    r["server_accepted_at_stop"] = delivered_at_stop
    r["server_accepted_at_cut"] = len(at_cut)
    seen: list[set[int]] = [set() for _ in range(n)]
    dups = late = 0
    top = [-1] * n
    for e in at_cut:
        w, s = int(e.get("wk", -1)), int(e.get("seq", -1))
        if not 0 <= w < n:
            continue
        if s in seen[w]:
            dups += 1
            continue
        seen[w].add(s)
        if s < top[w]:
            late += 1
        top[w] = max(top[w], s)
    r["duplicates"], r["late"] = dups, late
    by_idx = {x["idx"]: x for x in results}
    r["workers"] = []
    for i, rate in enumerate(rates):
        x = by_idx.get(i, {})
        rec = x.get("recorded", 0)
        r["workers"].append({
            "idx": i, "rate": rate, "recorded": rec, "delivered": len(seen[i]),
            "pct": 100.0 * len(seen[i]) / rec if rec else float("nan"),
            "dropped_staging": x.get("dropped_staging"), "staged_after_flush": x.get("staged_after_flush"),
            "flush": x.get("flush"), "discarded": x.get("discarded"),
            "cpu_us_per_event": x["cpu"] / rec * 1e6 if rec else float("nan"),
        })
    total_delivered = sum(w["delivered"] for w in r["workers"])
    for w in r["workers"]:
        w["share"] = 100.0 * w["delivered"] / total_delivered if total_delivered else float("nan")
    r["workers_reported"] = len(results)
    return r


def print_run(r: dict[str, Any]) -> None:
    C.table(
        ["run", "worker", "rate ev/s", "recorded", "delivered", "% of its own", "share of delivered",
         "dropped_staging (its process)", "staged after flush()", "discarded at close", "flush()"],
        [[r["run"], f"w{w['idx']}" + (" fast" if w["idx"] == 0 else " slow"),
          "max" if w["rate"] <= 0 else w["rate"], w["recorded"], w["delivered"], f"{w['pct']:.1f}",
          f"{w['share']:.1f}", w["dropped_staging"] if w["dropped_staging"] is not None else "?",
          w["staged_after_flush"] if w["staged_after_flush"] is not None else "?",
          w["discarded"] if w["discarded"] is not None else "?", w["flush"]]
         for w in r["workers"]],
        title=f"fairness run {r['run']}: latency {r['latency']} s per POST, {r['duration']} s recording, "
              f"flush bounded to {r['drain']} s more",
    )
    p = r["publisher"]
    print("- channel (publisher's stats at the cut, "
          f"{r['t_cut']:.1f} s after the start): " + ", ".join(f"{k}={p.get(k)}" for k in PUB_KEYS
                                                            if p.get(k) is not None))
    print(f"- at the cut: duplicates {r['duplicates']}, late (order broken) {r['late']}, server accepted "
          f"{r['server_accepted_at_cut']:,}; after the publisher was stopped (it sends what it "
          f"buffers) {r['server_accepted_at_stop']:,}; workers reported {r['workers_reported']}"
          + ("; hit its deadline" if r.get("timed_out") else "")
          + (f"; stopped stray processes {r['stray_pids']}" if r.get("stray_pids") else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--slow", type=int, default=3, help="slow workers (one fast worker besides)")
    ap.add_argument("--fast-rate", type=float, default=20_000, help="events/s of worker 0 (0: unpaced)")
    ap.add_argument("--slow-rate", type=float, default=200, help="events/s of each slow worker")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of recording")
    ap.add_argument("--latency", type=float, default=1.0, help="seconds the server waits before each answer")
    ap.add_argument("--drain", type=float, default=10.0, help="seconds the workers' flush() may take after")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.duration > 120 or args.drain > 120 or args.repeat > 10:
        ap.error("keep a run bounded: --duration and --drain at most 120 s, --repeat at most 10")
    clean_environment()
    C.install_cleanup()
    C.print_machine()
    print(f"samsara_mp {C.library_version()}, encoder {C.select_encoder('auto')}")
    tmp = tempfile.mkdtemp(prefix="bench-fair-", dir="/tmp")
    rows = []
    t_begin = time.monotonic()
    try:
        for run_no in range(1, args.repeat + 1):
            rows.append(run_once(args, tmp, run_no))
            print_run(rows[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"total benchmark time {time.monotonic() - t_begin:.0f} s; load average now {C.loadavg()}")
    C.save_json(args.json, {"machine": C.machine_info(), "library": C.library_version(),
                            "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
