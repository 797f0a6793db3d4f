"""``samsara-mp demo``: the whole data flow (docs/design.md) on one machine, with a verdict.

It starts the reference Ingestion API server (in this process), a publisher
owned by this process on a private channel in a fresh temporary runtime
directory, and N worker processes that record events through
``SamsaraClient``. While they run it shows the publisher's counters; at the
end it checks the accounting invariant (recorded = delivered + dropped +
rejected + buffered) against both the publisher and the server, stops every
process it started and removes the runtime directory.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .channel import Channel
from .client import SamsaraClient
from .errors import ChannelError, SamsaraError
from .ingest import IngestServer
from .publisher import Publisher

__all__ = ["add_arguments", "run"]

EVENT_NAME = "demo.page.viewed"
_PATHS = ("/", "/pricing", "/docs", "/blog/one-buffer", "/signup", "/account")
_TICK_S = 0.2
_PLAIN_EVERY_S = 1.0
_FAULT_SLOTS = 10_000  # POSTs covered by a --fault-rate pattern; far more than a demo makes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, added to ``parser``."""
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument(
        "--events", type=int, default=25_000, help="events per worker (default 25000)"
    )
    parser.add_argument("--port", type=int, default=0, help="ingestion server port (0: any free)")
    parser.add_argument(
        "--start-method", choices=("fork", "spawn", "forkserver"), default="fork",
        help="how worker processes start (default fork, as gunicorn preforks)",
    )
    parser.add_argument(
        "--no-progress", action="store_true",
        help="no live progress line; print a plain line every second instead",
    )
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, metavar="P",
        help="make the server answer this fraction of POSTs with 503, to watch retries (0..0.9)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS",
        help="give up (and stop everything) after this long (default 120)",
    )


@dataclass
class _Run:
    """What the demo saw: the workers' own reports and the publisher's last stats."""

    expected_workers: int
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    stats_error: str | None = None
    failed_workers: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def worker_recorded(self) -> int:
        return sum(int(r["recorded"]) for r in self.reports.values())


def _worker(index: int, events: int, url: str, channel: str, runtime_dir: str, results: Any) -> None:
    """One worker process: record ``events`` events, close the client, report."""
    started = time.monotonic()
    recorded = 0
    # The default configuration: a burst larger than the shared buffer waits in each
    # worker's staging until the buffer has room for it.
    client = SamsaraClient(url=url, sourceId=f"demo-worker-{index}", channel=channel,
                           runtime_dir=runtime_dir)
    shipped = False
    try:
        for k in range(events):
            client.record_event(eventName=EVENT_NAME, seq=k, worker=index, path=_PATHS[k % 6])
            recorded += 1
        shipped = client.flush(timeout=60.0)  # True: every event delivered, none lost
    finally:
        shipped = client.close(timeout=30.0) and shipped
        results.put(
            {"worker": index, "recorded": recorded, "shipped": shipped,
             "seconds": time.monotonic() - started}
        )


def _inject_faults(srv: IngestServer, rate: float) -> None:
    """Queue a random pattern: each of the next POSTs fails with 503 with probability ``rate``."""
    rng = random.Random()
    run_failing, run_length = False, 0
    for _ in range(_FAULT_SLOTS):
        failing = rng.random() < rate
        if failing != run_failing and run_length:
            srv.inject(status=503 if run_failing else None, count=run_length)
            run_length = 0
        run_failing = failing
        run_length += 1
    if run_length:
        srv.inject(status=503 if run_failing else None, count=run_length)


class _Progress:
    """Renders the publisher's counters: a live ``\\r`` line on a TTY, plain lines otherwise."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self.started = time.monotonic()
        self._last_plain = 0.0
        self._samples: deque[tuple[float, int]] = deque()
        self._width = 0

    def update(self, stats: dict[str, Any], final: bool = False) -> None:
        now = time.monotonic()
        delivered = int(stats.get("delivered", 0))
        self._samples.append((now, delivered))
        while len(self._samples) > 2 and now - self._samples[0][0] > 1.0:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        rate = (delivered - d0) / (now - t0) if now > t0 else 0.0
        line = (
            f"recorded {stats.get('recorded', 0):>9,}  delivered {delivered:>9,}  "
            f"dropped {stats.get('dropped_overflow', 0):>7,}  "
            f"buffered {stats.get('buffered', 0):>8,}  {rate:>9,.0f} ev/s  "
            f"{now - self.started:6.1f}s"
        )
        if self.live:
            self._width = max(self._width, len(line))
            self.out.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self.out.flush()
        elif final or now - self._last_plain >= _PLAIN_EVERY_S:
            self._last_plain = now
            print(line, file=self.out, flush=True)


def _drain_reports(results: Any, run: _Run) -> None:
    while True:
        try:
            report = results.get_nowait()
        except queue.Empty:
            return
        run.reports[int(report["worker"])] = report


def _observe(pub: Publisher, procs: list[Any], results: Any, progress: _Progress,
             run: _Run, deadline: float) -> None:
    """Show progress until the workers have ended and the publisher holds nothing."""
    workers_done = False
    while True:
        _drain_reports(results, run)
        if not workers_done and all(not p.is_alive() for p in procs):
            workers_done = True
            _drain_reports(results, run)
        try:
            run.stats = pub.stats(timeout=5.0)
            run.stats_error = None
        except (OSError, EOFError, ChannelError) as exc:
            run.stats_error = str(exc)
        if run.stats:
            done = workers_done and run.stats_error is None and run.stats.get("buffered") == 0
            progress.update(run.stats, final=done)
            if done:
                return
        if time.monotonic() >= deadline:
            run.timed_out = True
            if run.stats:
                progress.update(run.stats, final=True)
            return
        time.sleep(_TICK_S)


def _stop_processes(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(timeout=0 if proc.is_alive() else 5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)


def _stop_stray_publisher(channel: Channel, ours: int | None) -> None:
    """If our publisher died mid-run, a worker may have elected another: stop it too."""
    info = channel.read_info()
    pid = info.get("pid") if info else None
    if not isinstance(pid, int) or pid == ours:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline and not channel.lock_is_free():
        time.sleep(0.05)


def _summary(args: argparse.Namespace, run: _Run, server_count: int, elapsed: float,
             out: TextIO) -> bool:
    """Print the report; True when every event is accounted for."""
    s = run.stats
    recorded, delivered = int(s.get("recorded", 0)), int(s.get("delivered", 0))
    dropped, rejected = int(s.get("dropped_overflow", 0)), int(s.get("rejected", 0))
    buffered = int(s.get("buffered", 0))
    adds_up = recorded == delivered + dropped + rejected + buffered
    all_reached = run.worker_recorded == recorded and len(run.reports) == run.expected_workers
    server_agrees = server_count == delivered
    ok = (adds_up and all_reached and server_agrees and buffered == 0
          and not run.failed_workers and not run.timed_out and run.stats_error is None)
    raw, sent = int(s.get("bytes_raw", 0)), int(s.get("bytes_sent", 0))
    rows = [
        ("workers", f"{args.workers} x {args.events:,} events ({args.start_method})"),
        ("recorded", f"{run.worker_recorded:,} by the workers, {recorded:,} reached the publisher"),
        ("delivered", f"{delivered:,} (publisher), {server_count:,} (ingestion server)"),
        ("dropped", f"{dropped:,}"),
        ("flush()", f"True in {sum(1 for r in run.reports.values() if r.get('shipped'))} of "
                    f"{run.expected_workers} workers"),
        ("rejected", f"{rejected:,}"),
        ("buffered", f"{buffered:,}"),
        ("elapsed", f"{elapsed:.2f} s"),
        ("delivered/s", f"{delivered / elapsed:,.0f}" if elapsed > 0 else "-"),
        ("requests", (f"{s.get('requests', 0):,} in {s.get('batches', 0):,} batches, "
                      f"{s.get('retries', 0):,} retries")),
        ("bytes", f"{raw:,} raw -> {sent:,} sent"),
    ]
    print("\nsamsara-mp demo summary", file=out)
    for name, value in rows:
        print(f"  {name:<12} {value}", file=out)
    problems = []
    if not adds_up:
        problems.append(f"recorded {recorded:,} != delivered + dropped + rejected + buffered "
                        f"({delivered + dropped + rejected + buffered:,})")
    if not all_reached:
        problems.append("some recorded events never reached the publisher")
    if not server_agrees:
        problems.append(f"the server counted {server_count:,}, the publisher {delivered:,}")
    if buffered:
        problems.append(f"{buffered:,} events still buffered")
    problems += run.failed_workers
    if run.timed_out:
        problems.append(f"gave up after {args.timeout:g} s")
    if run.stats_error:
        problems.append(f"publisher stopped answering: {run.stats_error}")
    if ok:
        print(f"  {'verdict':<12} OK: recorded = delivered + dropped + rejected + buffered "
              f"({recorded:,} = {delivered:,} + {dropped:,} + {rejected:,} + {buffered:,})",
              file=out)
    else:
        print(f"  {'verdict':<12} FAILED: " + "; ".join(problems), file=out)
    return ok


def _check(args: argparse.Namespace) -> str | None:
    if args.workers < 1:
        return "--workers must be at least 1"
    if args.events < 0:
        return "--events must be at least 0"
    if not 0.0 <= args.fault_rate <= 0.9:
        return "--fault-rate must be between 0 and 0.9"
    if args.timeout <= 0:
        return "--timeout must be positive"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every event was delivered or counted as dropped."""
    problem = _check(args)
    if problem:
        print(f"samsara-mp demo: {problem}", file=sys.stderr)
        return 2
    out = sys.stdout
    ctx = multiprocessing.get_context(args.start_method)
    runtime_dir = tempfile.mkdtemp(prefix="samsara-mp-demo-")
    channel_name = f"samsara-mp-demo-{os.getpid()}"
    srv = IngestServer(port=args.port, admin_port=None, store="count")
    procs: list[Any] = []
    run_state = _Run(expected_workers=args.workers)
    pub: Publisher | None = None
    try:
        srv.start()
        if args.fault_rate:
            _inject_faults(srv, args.fault_rate)
        print(f"samsara-mp demo: server {srv.url}, channel {channel_name}, "
              f"{args.workers} workers x {args.events:,} events", file=out, flush=True)
        pub = Publisher(url=srv.url, channel=channel_name, runtime_dir=runtime_dir)
        started = time.monotonic()
        with pub:
            results = ctx.Queue()
            procs = [
                ctx.Process(
                    target=_worker, name=f"demo-worker-{i}",
                    args=(i, args.events, srv.url, channel_name, runtime_dir, results),
                )
                for i in range(args.workers)
            ]
            for proc in procs:
                proc.start()
            progress = _Progress(out, live=out.isatty() and not args.no_progress)
            _observe(pub, procs, results, progress, run_state, started + args.timeout)
            elapsed = time.monotonic() - started
            _stop_processes(procs)
            _drain_reports(results, run_state)
        for proc in procs:
            if proc.exitcode != 0:
                run_state.failed_workers.append(f"{proc.name} exited with {proc.exitcode}")
        _stop_stray_publisher(pub.channel, pub.pid)
        server_count = srv.event_count()
    except (SamsaraError, OSError) as exc:
        print(f"samsara-mp demo: {exc}", file=sys.stderr)
        if pub is not None:
            _show_log(pub.channel.dir / "publisher.log")
        return 1
    finally:
        _stop_processes(procs)
        srv.stop()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    return 0 if _summary(args, run_state, server_count, elapsed, out) else 1


def _show_log(path: Path) -> None:
    try:
        tail = path.read_text(errors="replace").splitlines()[-20:]
    except OSError:
        return
    if tail:
        print(f"last lines of {path}:", file=sys.stderr)
        for line in tail:
            print("  " + line, file=sys.stderr)
