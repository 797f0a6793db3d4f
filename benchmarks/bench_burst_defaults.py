"""A burst at the default configuration on a cold channel, against per-process clients.

What a new user gets when a preforked app records a burst and nothing is
tuned: samsara_mp with only ``url`` and ``channel`` set (plus a private
``runtime_dir``, so each run is a cold channel of its own), against the
per-process clients users would otherwise pick, each at its own defaults.
Every scenario records the same number of events (default 100,000) and gets
a fresh sink; the samsara_mp ones also a unique channel name and a new
runtime directory under a temporary directory, with no publisher running:

A  samsara_mp: one ``SamsaraClient(url=..., channel=..., runtime_dir=...)``
   made in the parent (it launches the channel's publisher as it is made),
   N forked workers x E events through the inherited client; each worker then
   calls ``client.flush(timeout=60)``, reports the answer, and ``close()``.
B  samsara_mp: 2N spawned workers (fresh interpreters, ``subprocess``) x E/2
   events, each making its own ``SamsaraClient(url=..., channel=...,
   runtime_dir=...)`` after the start signal (the first elects the
   publisher); ``flush(timeout=60)``, ``close()``.
C  PostHog (``posthog``): ``Posthog("phc_bench", host=sink)`` made in each of
   N forked workers, E ``capture()`` calls, then ``flush(timeout_seconds=60)``
   and ``shutdown()``. Its defaults: max_queue_size 10,000, flush_at 100,
   flush_interval 5 s, no gzip, one consumer thread, capture v0 ``/batch/``.
D  Segment (``segment-analytics-python``): ``Client(write_key="bench",
   host=sink)`` in each of N forked workers, E ``track()`` calls, then
   ``flush()`` and ``join()``. Its defaults: max_queue_size 10,000,
   upload_size 100, upload_interval 0.5 s, no gzip, one consumer thread.

N = ``--workers`` (4), E = ``--events`` per worker (25,000). Workers are made
and wait at a pipe; the start signal (the parent closes the pipe) releases
them together. A client a worker makes of its own is made after the signal,
so a samsara_mp channel is still cold when the burst begins.

Events: samsara_mp records ``eventName="bench.burst", sourceId="w<i>",
seq=<n>, wk=<i>`` (the client adds ``timestamp``): 84-88 bytes of JSON, 87
on average. PostHog and Segment get the same name, ``distinct_id``/``user_id``
``w<i>`` and ``properties={"seq": n, "wk": i}`` (their own envelopes make
them larger on the wire).

Measured per run: events delivered at the sink (distinct (wk, seq) pairs) and
their share, duplicates, whether each worker's events arrived in the order
recorded ("late": an event that arrived after a later one of its worker), the
answers of ``flush()`` (samsara_mp), events the PostHog/Segment clients
refused at ``capture``/``track`` (their queue was full), the samsara_mp
publisher's accounting read through a client's ``stats()["channel"]`` before
it is stopped (dropped_overflow = dropped_buffer + dropped_staging, rejected,
buffered), wall time (start signal to the later of the last worker done and
the sink's last accepted batch), and CPU per event: the workers' own
(getrusage, their threads included) and the publisher's (/proc/<pid>/stat).
A run ends when every worker reported and the sink's count has not grown for
3 s (or all arrived), or at its deadline (``--deadline``, 150 s): workers stop
recording past it, and every process still running then is stopped by pid.

The sinks: the reference server (``samsara_mp.ingest``, ``store=memory``, its
own process) for A and B; ``_batch_sink.py`` (``--keys``, its own process)
for C and D. Loopback only: the clients are given the sink's
``http://127.0.0.1`` address; in the PostHog and Segment workers
``socket.getaddrinfo`` and ``socket.connect`` refuse any host but loopback
(counted as "outside"), which changes nothing at their defaults: PostHog
polls feature flags only with a personal/secret API key, and captures send
no flag requests unless asked, so no default of either is changed. Process
environment: ``SAMSARA_MP_*`` and ``POSTHOG_*`` variables are removed (they
would change the defaults) and ``no_proxy`` covers 127.0.0.1. The libraries'
own WARNING lines (one per refused event for PostHog and Segment) are
counted by a handler in each worker rather than written to stderr, so the
cost of writing them is not in the figures.

    python benchmarks/bench_burst_defaults.py [--scenarios A,B,C,D] [--workers 4]
        [--events 25000] [--repeat 1] [--deadline 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from samsara_mp import SamsaraClient  # noqa: E402
from samsara_mp.channel import Channel  # noqa: E402
from samsara_mp.config import Config  # noqa: E402

EVENT = "bench.burst"
FLUSH_TIMEOUT = 60.0
READY_TIMEOUT = 60.0  # for every worker to be made and waiting
QUIET_S = 3.0  # after every worker reported: the sink's count unchanged this long ends the run
POLL_S = 0.1
LOGGER = {"A": "samsara_mp", "B": "samsara_mp", "C": "posthog", "D": "segment"}
IMPL = {"A": "samsara_mp, client made before fork", "B": "samsara_mp, spawned, own clients",
        "C": "PostHog, per process", "D": "Segment, per process"}
PUB_KEYS = ("recorded", "delivered", "dropped_overflow", "dropped_buffer", "dropped_staging",
            "rejected", "buffered", "staged", "spooled", "dropped_spool", "stats_events", "batches",
            "requests")


# ------------------------------------------------------------------ workers

class LogCount(logging.Handler):
    """Counts a library's WARNING-and-above records and keeps the first few."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []
        logger = logging.getLogger(name)
        logger.addHandler(self)
        logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 2:
            self.first.append(record.getMessage()[:160])


def guard_loopback() -> list[str]:
    """Refuse name lookups and connections to anything but loopback in this process;
    the list fills with what was refused."""
    refused: list[str] = []
    loopback = ("127.0.0.1", "localhost", "::1")
    real_gai = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def host_of(host: Any) -> str:
        return host.decode() if isinstance(host, bytes) else str(host)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and host_of(host) not in loopback:
            refused.append(f"getaddrinfo {host_of(host)}")
            raise socket.gaierror(socket.EAI_NONAME, "refused by the benchmark: not loopback")
        return real_gai(host, *args, **kwargs)

    def allowed(sock: socket.socket, address: Any) -> bool:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host_of(address[0]) not in loopback:
            refused.append(f"connect {address[0]}")
            return False
        return True

    def connect(self: socket.socket, address: Any) -> None:
        if not allowed(self, address):
            raise ConnectionRefusedError("refused by the benchmark: not loopback")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        return real_connect_ex(self, address) if allowed(self, address) else 111  # ECONNREFUSED

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    return refused


def _send(fd: int, obj: dict[str, Any]) -> None:
    line = (json.dumps(obj) + "\n").encode()
    assert len(line) <= select.PIPE_BUF, "a report must be one atomic pipe write"
    os.write(fd, line)


def worker(spec: dict[str, Any], report_fd: int, start_fd: int, inherited: SamsaraClient | None) -> None:
    """One worker: report ready, wait for the start signal, record, flush, report."""
    kind, idx, count = spec["kind"], spec["idx"], spec["count"]
    logs = LogCount(LOGGER[kind])
    outside = guard_loopback() if kind in ("C", "D") else []
    _send(report_fd, {"ready": idx})
    if not select.select([start_fd], [], [], READY_TIMEOUT + 30)[0]:
        return  # never started: record nothing
    os.read(start_fd, 1)
    deadline = spec["deadline_at"]
    src = f"w{idx}"
    cpu0, t0 = C.self_cpu_seconds(), time.time()
    res: dict[str, Any] = {"idx": idx, "t0": t0, "flush": None, "refused": 0}
    done = 0
    if kind in ("A", "B"):
        client = inherited if kind == "A" else SamsaraClient(
            url=spec["url"], channel=spec["channel"], runtime_dir=spec["rundir"])
        assert client is not None
        rec = client.record_event
        for i in range(count):
            if not i & 1023 and time.time() > deadline:
                break
            rec(eventName=EVENT, sourceId=src, seq=i, wk=idx)
            done += 1
        res["t_rec"] = time.time()
        res["flush"] = client.flush(timeout=FLUSH_TIMEOUT)
        res["t_flush"] = time.time()
        res["close"] = client.close()
        # Private, as bench_throughput reads them: stats() would ask the publisher again.
        res["dropped_staging"] = client._staging.dropped
        res["discarded"] = client.discarded
    elif kind == "C":
        from posthog import Posthog

        ph = Posthog("phc_bench", host=spec["url"])
        capture = ph.capture
        for i in range(count):
            if not i & 1023 and time.time() > deadline:
                break
            if capture(EVENT, distinct_id=src, properties={"seq": i, "wk": idx}) is None:
                res["refused"] += 1
            done += 1
        res["t_rec"] = time.time()
        ph.flush(timeout_seconds=FLUSH_TIMEOUT)
        res["t_flush"] = time.time()
        ph.shutdown()
    else:
        from segment.analytics.client import Client

        sg = Client(write_key="bench", host=spec["url"])
        track = sg.track
        for i in range(count):
            if not i & 1023 and time.time() > deadline:
                break
            ok, _ = track(user_id=src, event=EVENT, properties={"seq": i, "wk": idx})
            res["refused"] += not ok
            done += 1
        res["t_rec"] = time.time()
        sg.flush()  # no timeout of its own: the parent's deadline bounds it (stop by pid)
        res["t_flush"] = time.time()
        sg.join()
    res.update(recorded=done, t_done=time.time(), cpu=C.self_cpu_seconds() - cpu0,
               warnings=logs.count, warning_first=logs.first, outside=len(outside),
               outside_first=outside[:2])
    _send(report_fd, res)


def fork_worker(spec: dict[str, Any], fds: dict[str, int], inherited: SamsaraClient | None) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            C.forget_in_child()
            os.close(fds["start_w"])
            os.close(fds["report_r"])
            worker(spec, fds["report_w"], fds["start_r"], inherited)
            code = 0
        except BaseException:  # noqa: BLE001 - a worker's failure is printed, then it ends
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return C.track(pid, "worker")


_SPAWNED: list[subprocess.Popen[bytes]] = []  # kept, so subprocess does not reap them behind our back


def spawn_worker(spec: dict[str, Any], fds: dict[str, int]) -> int:
    proc = subprocess.Popen(
        [C.PY, str(Path(__file__).resolve()), "--worker", json.dumps(spec),
         "--fds", f"{fds['report_w']},{fds['start_r']}"],
        pass_fds=(fds["report_w"], fds["start_r"]), stdin=subprocess.DEVNULL, env=C._child_env(),
    )
    _SPAWNED.append(proc)
    return C.track(proc.pid, "spawned worker")


class Reports:
    """The workers' JSON lines on one pipe (each line one atomic write)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, b"", False

    def read(self, timeout: float) -> list[dict[str, Any]]:
        if self.eof or not select.select([self.fd], [], [], max(timeout, 0.0))[0]:
            if self.eof:
                time.sleep(max(timeout, 0.0))
            return []
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True  # every worker has ended
            return []
        *lines, self.buf = (self.buf + chunk).split(b"\n")
        return [json.loads(line) for line in lines if line]


# ------------------------------------------------------------------ runner

def order_check(pairs: list[tuple[int, int]], n: int, per: int) -> dict[str, Any]:
    """Distinct, duplicate and late (wk, seq) pairs of an arrival-ordered list."""
    seen = bytearray(n * per)
    top = [-1] * n
    per_worker = [0] * n
    dups = late = other = 0
    for w, s in pairs:
        if not (0 <= w < n and 0 <= s < per):
            other += 1
            continue
        k = w * per + s
        if seen[k]:
            dups += 1
            continue
        seen[k] = 1
        per_worker[w] += 1
        if s < top[w]:
            late += 1
        else:
            top[w] = s
    return {"delivered": sum(per_worker), "duplicates": dups, "late": late, "other_events": other,
            "delivered_per_worker": per_worker}


def stray_pids(path: str, exclude: set[int]) -> list[int]:
    """Processes (of this user: others' fds are unreadable) with a file open under ``path``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(path):
                    found.append(int(entry))
                    break
        except OSError:
            continue
    return found


def log_warnings(path: Path) -> tuple[int, list[str]]:
    """WARNING/ERROR lines of a publisher's log, and the first two."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0, []
    hits = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln]
    return len(hits), [h[:200] for h in hits[:2]]


def run_scenario(sc: str, n: int, per: int, deadline_s: float, tmp: str, run_no: int) -> dict[str, Any]:
    C.wait_quiet()
    mp_kind = sc in ("A", "B")
    sink: C.IngestProcess | C.BatchSink = (C.IngestProcess(store="memory") if mp_kind
                                           else C.BatchSink(keys=True))
    channel = f"burst-{sc}{run_no}-{os.getpid()}"
    rundir = tempfile.mkdtemp(prefix=f"{sc}{run_no}-", dir=tmp)
    report_r, report_w = os.pipe()
    start_r, start_w = os.pipe()
    fds = {"report_r": report_r, "report_w": report_w, "start_r": start_r, "start_w": start_w}
    pids: list[int] = []
    pub_pid: int | None = None
    parent: SamsaraClient | None = None
    results: list[dict[str, Any]] = []
    r: dict[str, Any] = {"scenario": sc, "impl": IMPL[sc], "run": run_no, "workers": n, "per_worker": per,
                         "events": n * per, "channel": channel if mp_kind else None}
    t_start = time.time()
    try:
        if sc == "A":
            parent = SamsaraClient(url=sink.url, channel=channel, runtime_dir=rundir)
        spec = {"kind": sc, "count": per, "url": sink.url, "channel": channel, "rundir": rundir,
                "deadline_at": time.time() + deadline_s}
        for i in range(n):
            spec["idx"] = i
            pids.append(spawn_worker(spec, fds) if sc == "B" else fork_worker(spec, fds, parent))
        os.close(fds.pop("report_w"))  # the workers' copies stay: EOF once they all ended
        os.close(fds.pop("start_r"))
        reports = Reports(report_r)
        ready: set[int] = set()
        t_ready = time.monotonic() + READY_TIMEOUT
        while len(ready) < n and time.monotonic() < t_ready and not reports.eof:
            ready.update(m["ready"] for m in reports.read(0.5) if "ready" in m)
        if len(ready) < n:
            raise RuntimeError(f"only {len(ready)} of {n} workers were ready within {READY_TIMEOUT:.0f} s")
        busy0 = C.machine_cpu_seconds()[0]
        own0 = C.self_cpu_seconds() + C.proc_cpu_seconds(sink.pid)
        t_start = time.time()
        os.close(fds.pop("start_w"))  # the start signal: every worker's read returns
        deadline = time.monotonic() + deadline_s
        while len(results) < n and time.monotonic() < deadline and not reports.eof:
            results.extend(m for m in reports.read(POLL_S) if "idx" in m)
        seen, changed = sink.accepted(), time.monotonic()
        while time.monotonic() < deadline and seen < n * per:
            time.sleep(POLL_S)
            now = sink.accepted()
            if now != seen:
                seen, changed = now, time.monotonic()
            elif time.monotonic() - changed >= QUIET_S:
                break
        last_accept = sink.last_accept_at or t_start
        r["timed_out"] = time.monotonic() >= deadline
        if mp_kind:
            config = Config.build(env={}, url=sink.url, channel=channel, runtime_dir=rundir)
            pub_pid, r["publisher"] = C.channel_accounting(sink.url, channel, rundir, PUB_KEYS)
            r["publisher_cpu_s"] = C.proc_cpu_seconds(pub_pid) if pub_pid and C.pid_alive(pub_pid) else 0.0
            r["publisher_log_warnings"], r["publisher_log_first"] = log_warnings(Channel(config).dir
                                                                                 / "publisher.log")
        busy1, t_busy1 = C.machine_cpu_seconds()[0], time.time()
        own1 = C.self_cpu_seconds() + C.proc_cpu_seconds(sink.pid)
    finally:
        for p in pids:  # workers: ended by now (a zombie is not alive), else stopped; reaped by pid
            C.wait_until(lambda p=p: not C.pid_alive(p), timeout=2.0)
            C.stop_pid(p, grace=2.0)
        for fd in fds.values():  # only those not closed above (a closed number may be reused)
            os.close(fd)
        if parent is not None:
            parent.close()
        if pub_pid is not None:
            C.stop_pid(pub_pid, grace=15.0)
        for p in stray_pids(rundir, {os.getpid(), sink.pid}):  # a publisher we did not know of
            r.setdefault("stray_pids", []).append(p)
            C.stop_pid(p, grace=5.0)
    try:
        if mp_kind:
            assert isinstance(sink, C.IngestProcess)
            events = sink.events()
            pairs = [(int(e.get("wk", -1)), int(e.get("seq", -1))) for e in events
                     if e.get("eventName") == EVENT]
            r["sink_other_events"] = len(events) - len(pairs)
        else:
            assert isinstance(sink, C.BatchSink)
            pairs = sink.keys()
            r["sink_paths"] = sink.stats()["paths"]
    finally:
        sink.stop()
        shutil.rmtree(rundir, ignore_errors=True)

    r.update(order_check(pairs, n, per))
    r["arrived"] = len(pairs)
    r["pct"] = 100.0 * r["delivered"] / (n * per)
    r["workers_reported"] = len(results)
    r["recorded"] = sum(x["recorded"] for x in results)
    r["flush"] = [x["flush"] for x in sorted(results, key=lambda x: x["idx"])] if mp_kind else None
    r["refused"] = sum(x["refused"] for x in results)
    r["worker_dropped_staging"] = sum(x.get("dropped_staging", 0) for x in results)
    r["worker_discarded"] = sum(x.get("discarded", 0) for x in results)
    r["warnings"] = sum(x["warnings"] for x in results)
    r["warning_first"] = next((x["warning_first"] for x in results if x["warning_first"]), [])
    r["outside"] = sum(x["outside"] for x in results)
    r["outside_first"] = next((x["outside_first"] for x in results if x["outside_first"]), [])
    t_done = max((x["t_done"] for x in results), default=time.time())
    r["record_s"] = max((x["t_rec"] for x in results), default=t_start) - t_start
    r["wall_s"] = max(t_done, last_accept) - t_start
    worker_cpu = sum(x["cpu"] for x in results)
    r["worker_us_per_event"] = worker_cpu / (n * per) * 1e6
    pub_cpu = r.get("publisher_cpu_s", 0.0)
    r["publisher_us_per_event"] = pub_cpu / (n * per) * 1e6 if mp_kind else float("nan")
    foreign = (busy1 - busy0) - (own1 - own0) - worker_cpu - pub_cpu
    # The share of the machine other processes used from the start signal to the stats (the
    # quiet wait included): others' tests share these cores.
    r["others_cpu"] = max(0.0, foreign) / (os.cpu_count() or 1) / max(t_busy1 - t_start, 1e-9)
    return r


# ------------------------------------------------------------------ report

def flush_text(answers: list[Any] | None) -> str:
    if answers is None:
        return "-"
    if answers and all(a is True for a in answers):
        return f"True x{len(answers)}"
    return ",".join("T" if a is True else "F" if a is False else "?" for a in answers)


def print_tables(rows: list[dict[str, Any]]) -> str:
    main = C.table(
        ["scenario", "run", "workers x events", "delivered", "%", "dups", "order kept", "flush() says",
         "refused at enqueue", "wall s", "worker CPU µs/ev", "publisher CPU µs/ev", "others' CPU"],
        [[f"{r['scenario']}. {r['impl']}", r["run"], f"{r['workers']} x {r['per_worker']:,}",
          r["delivered"], f"{r['pct']:.1f}", r["duplicates"],
          "yes" if not r["late"] else f"no ({r['late']:,} late)", flush_text(r["flush"]),
          r["refused"] if r["scenario"] in ("C", "D") else "-", r["wall_s"], r["worker_us_per_event"],
          r["publisher_us_per_event"], f"{r['others_cpu']:.0%}"] for r in rows],
        title="burst at the default configuration (delivered = distinct events at the sink)",
    )
    mp_rows = [r for r in rows if "publisher" in r]
    acct = ""
    if mp_rows:
        keys = ("recorded", "delivered", "dropped_overflow", "dropped_buffer", "dropped_staging",
                "rejected", "buffered", "staged")
        acct = C.table(
            ["scenario", "run", *keys, "unaccounted", "at the sink"],
            [[r["scenario"], r["run"], *(r["publisher"].get(k) if r["publisher"].get(k) is not None else "?"
                                         for k in keys),
              _unaccounted(r["publisher"]), r["delivered"]] for r in mp_rows],
            title="samsara_mp publisher's accounting (stats()['channel'] before it was stopped)",
        )
    return main + ("\n" + acct if acct else "")


def _unaccounted(p: dict[str, Any]) -> Any:
    try:
        return (p["recorded"] - p["delivered"] - p["dropped_overflow"] - p["rejected"] - p["buffered"]
                - p["staged"])
    except (KeyError, TypeError):
        return "?"


def notes(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        extra = []
        if r["workers_reported"] < r["workers"]:
            extra.append(f"only {r['workers_reported']} of {r['workers']} workers reported")
        if r.get("timed_out"):
            extra.append("hit its deadline")
        if r["recorded"] < r["events"]:
            extra.append(f"recorded {r['recorded']:,} of {r['events']:,}")
        if r["other_events"]:
            extra.append(f"{r['other_events']} events with an unknown (wk, seq)")
        if r["warnings"]:
            extra.append(f"{r['warnings']:,} library warnings in workers, first: {r['warning_first']}")
        if r.get("publisher_log_warnings"):
            extra.append(f"publisher log: {r['publisher_log_warnings']} warnings, first: "
                         f"{r['publisher_log_first']}")
        if r["outside"]:
            extra.append(f"{r['outside']} non-loopback lookups/connections refused, "
                         f"e.g. {r['outside_first']}")
        if r.get("worker_dropped_staging") or r.get("worker_discarded"):
            extra.append(f"workers' own staging drops {r['worker_dropped_staging']:,}, "
                         f"discarded at close {r['worker_discarded']:,}")
        if r.get("sink_paths"):
            extra.append(f"sink requests {r['sink_paths']}")
        if r.get("stray_pids"):
            extra.append(f"stopped stray processes {r['stray_pids']}")
        if r.get("publisher", {}).get("error"):
            extra.append(f"stats() error: {r['publisher']['error']}")
        extra.append(f"record {r['record_s']:.2f} s; per-worker delivered {r['delivered_per_worker']}")
        out.append(f"- {r['scenario']} run {r['run']}: " + "; ".join(extra))
    return out


def clean_environment() -> list[str]:
    """Drop settings that would change a library's defaults; keep loopback off any proxy."""
    removed = sorted(k for k in os.environ if k.startswith(("SAMSARA_MP_", "POSTHOG_")))
    for k in removed:
        del os.environ[k]
    for k in ("no_proxy", "NO_PROXY"):
        os.environ[k] = ",".join(filter(None, [os.environ.get(k), "127.0.0.1,localhost"]))
    return removed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--scenarios", default="A,B,C,D")
    ap.add_argument("--workers", type=int, default=4,
                    help="forked workers of A, C, D (B spawns twice as many)")
    ap.add_argument("--events", type=int, default=25_000,
                    help="events per forked worker (B's workers record half as many each)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each scenario")
    ap.add_argument("--deadline", type=float, default=150.0, help="seconds per run, start signal to the end")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a spawned worker's spec
    ap.add_argument("--fds", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        report_fd, start_fd = (int(x) for x in args.fds.split(","))
        worker(json.loads(args.worker), report_fd, start_fd, None)
        return 0

    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    if any(s not in IMPL for s in scenarios):
        ap.error("--scenarios takes letters among A,B,C,D")
    removed = clean_environment()
    C.install_cleanup()
    C.print_machine()
    print(f"samsara_mp encoder: {C.select_encoder('auto')}; posthog "
          f"{_version('posthog')}, segment-analytics-python {_version('segment-analytics-python')}")
    if removed:
        print(f"removed from the environment: {', '.join(removed)}")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    tmp = tempfile.mkdtemp(prefix="bench-burst-", dir="/tmp")
    t_begin = time.monotonic()
    try:
        for run_no in range(1, args.repeat + 1):
            for sc in scenarios:
                if sc in ("C", "D"):
                    why = C.importable("posthog" if sc == "C" else "segment.analytics.client")
                    if why:
                        if run_no == 1:
                            skipped.append(f"{sc} skipped: {why} (pip install -e '.[bench]')")
                        continue
                n, per = (2 * args.workers, args.events // 2) if sc == "B" else (args.workers, args.events)
                print(f"run {run_no}, scenario {sc}: {IMPL[sc]}, {n} x {per:,} ...", flush=True)
                rows.append(run_scenario(sc, n, per, args.deadline, tmp, run_no))
                r = rows[-1]
                print(f"  delivered {r['delivered']:,} of {r['events']:,} ({r['pct']:.1f} %) in "
                      f"{r['wall_s']:.1f} s; flush {flush_text(r['flush'])}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print_tables(rows)
    for line in notes(rows) + skipped:
        print(line)
    print(f"total benchmark time {time.monotonic() - t_begin:.0f} s; load average now {C.loadavg()}")
    C.save_json(args.json, {"machine": C.machine_info(), "library": C.library_version(),
                            "args": vars(args), "rows": rows, "skipped": skipped})
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
