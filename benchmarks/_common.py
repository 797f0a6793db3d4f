"""Shared helpers of the benchmark scripts: processes, /proc readings, statistics, tables.

Everything a benchmark starts (the reference Ingestion API server, sinks,
feeders, publishers) is tracked here by pid and stopped by pid: SIGCONT first
(a benchmark may have SIGSTOPped it), then SIGTERM, then SIGKILL after a
grace period. ``cleanup()`` runs at exit and on SIGTERM/SIGINT, so an
interrupted benchmark leaves nothing behind. Loopback only.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The event every benchmark records unless it says otherwise (as in the brief's sketch).
EVENT_NAME = "bench.event"
PAYLOAD = "x" * 50

# --------------------------------------------------------------- processes

_TRACKED: dict[int, str] = {}  # pid -> what it is


def track(pid: int, what: str) -> int:
    """Remember a pid this benchmark started, so cleanup() stops it."""
    _TRACKED[pid] = what
    return pid


def untrack(pid: int) -> None:
    _TRACKED.pop(pid, None)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_pid(pid: int, grace: float = 5.0) -> None:
    """Stop one process we started: SIGCONT, SIGTERM, wait ``grace``, then SIGKILL."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            untrack(pid)
            return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            untrack(pid)
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(100):
        _reap(pid)
        if not pid_alive(pid):
            break
        time.sleep(0.02)
    untrack(pid)


def cleanup() -> None:
    """Stop every tracked process, newest first."""
    for pid in reversed(list(_TRACKED)):
        stop_pid(pid, grace=3.0)


def _on_signal(signum: int, frame: Any) -> None:
    cleanup()
    sys.exit(128 + signum)


def install_cleanup() -> None:
    """Call once in a benchmark's main process (not in workers)."""
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def forget_in_child() -> None:
    """In a child forked from a benchmark's main process: default SIGTERM/SIGINT, and
    no tracked pids, so a SIGTERM from the parent (stop_pid) ends just this child
    rather than running the parent's cleanup() against the parent's processes."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _TRACKED.clear()


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """Poll ``pred`` until it returns something truthy or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_ready_process(
    args: Sequence[str], what: str, timeout: float = 20.0
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start ``args`` with ``--ready-file F`` appended; wait for F's JSON line; tracked."""
    fd, ready = tempfile.mkstemp(prefix="bench-ready-", dir="/tmp")
    os.close(fd)
    os.unlink(ready)
    proc = subprocess.Popen(
        [*args, "--ready-file", ready],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=_child_env(),
    )
    track(proc.pid, what)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
            try:
                with open(ready) as f:
                    text = f.read()
                if text.endswith("\n"):
                    return proc, json.loads(text)
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                stop_pid(proc.pid)
                raise RuntimeError(f"{what} not ready within {timeout}s")
            time.sleep(0.02)
    finally:
        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass


class Http:
    """A keep-alive JSON client for one loopback host (cheap to poll with)."""

    def __init__(self, base: str, timeout: float = 5.0) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if data is not None else {}
                self._conn.request(method, path, body=data, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class IngestProcess:
    """The reference Ingestion API server as its own process (``store=count`` by default)."""

    def __init__(self, store: str = "count", timeout: float = 20.0) -> None:
        self.proc, info = start_ready_process(
            [PY, "-m", "samsara_mp.ingest", "--port", "0", "--store", store],
            "ingest server", timeout,
        )
        self.url: str = info["url"]
        self.admin_url: str = info["admin_url"]
        self.pid: int = self.proc.pid
        self.admin = Http(self.admin_url)

    def stats(self) -> dict[str, Any]:
        status, body = self.admin.request("GET", "/_test/stats")
        if status != 200:
            raise RuntimeError(f"/_test/stats answered {status}")
        return body  # type: ignore[no-any-return]

    def accepted(self) -> int:
        """Events accepted so far; also sets ``last_accept_at`` (the server's clock)."""
        stats = self.stats()
        self.last_accept_at: float | None = stats["last_accept_at"]
        return int(stats["accepted_events"])

    def events(self, page: int = 20_000) -> list[dict[str, Any]]:
        """Every accepted event in arrival order (``store="memory"``), read in pages."""
        admin = Http(self.admin_url, timeout=60.0)
        out: list[dict[str, Any]] = []
        try:
            while True:
                status, body = admin.request("GET", f"/_test/events?offset={len(out)}&limit={page}")
                if status != 200:
                    raise RuntimeError(f"/_test/events answered {status}")
                out.extend(body)
                if len(body) < page:
                    return out
        finally:
            admin.close()

    def set_online(self, online: bool) -> None:
        status, _ = self.admin.request("PUT", "/v1/api-status", {"status": "online" if online else "offline"})
        if status != 200:
            raise RuntimeError(f"PUT /v1/api-status answered {status}")

    def wait_accepted(self, target: int, timeout: float, interval: float = 0.005) -> tuple[int, float]:
        """Poll until ``accepted_events >= target``; (count seen, time.time() when seen)."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.accepted()
            now = time.time()
            if n >= target or time.monotonic() >= deadline:
                return n, now
            time.sleep(interval)

    def stop(self) -> None:
        self.admin.close()
        stop_pid(self.pid)

    def __enter__(self) -> IngestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BatchSink:
    """A tiny stdlib counting server for Segment's ``POST /v1/batch`` and PostHog's
    ``POST /batch/`` (``_batch_sink.py``, its own process). ``keys=True``: it also
    keeps each event's ``properties`` ``wk`` and ``seq`` in arrival order (:meth:`keys`)."""

    def __init__(self, keys: bool = False, timeout: float = 20.0) -> None:
        self.proc, info = start_ready_process(
            [PY, str(BENCH_DIR / "_batch_sink.py"), *(["--keys"] if keys else [])], "batch sink", timeout
        )
        self.url: str = info["url"]
        self.pid: int = self.proc.pid
        self.http = Http(self.url)

    def stats(self) -> dict[str, Any]:
        return self.http.request("GET", "/stats")[1]  # type: ignore[no-any-return]

    def accepted(self) -> int:
        """Events counted so far; also sets ``last_accept_at`` (the sink's clock)."""
        stats = self.stats()
        self.last_accept_at: float | None = stats["last_at"]
        return int(stats["events"])

    def keys(self) -> list[tuple[int, int]]:
        """(wk, seq) of every event counted, in arrival order (started with ``keys=True``)."""
        body = Http(self.url, timeout=60.0).request("GET", "/keys")[1]
        return list(zip(body["wk"], body["seq"], strict=True))

    def wait_accepted(self, target: int, timeout: float, interval: float = 0.005) -> tuple[int, float]:
        deadline = time.monotonic() + timeout
        while True:
            n = self.accepted()
            now = time.time()
            if n >= target or time.monotonic() >= deadline:
                return n, now
            time.sleep(interval)

    def stop(self) -> None:
        self.http.close()
        stop_pid(self.pid)


# ------------------------------------------------------------------ /proc

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" field 0 is state (stat field 3); utime, stime are stat fields 14, 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status: VmRSS, VmHWM, ..."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat.

    Busy is user + nice + system only: irq/softirq time (loopback traffic) is
    not charged to any process's utime/stime either, so leaving it out keeps
    "busy minus our processes" a fair estimate of what others used.
    """
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    total = sum(vals[:8])  # guest time is already inside user
    return (vals[0] + vals[1] + vals[2]) / CLK_TCK, total / CLK_TCK


def wait_quiet(max_busy: float = 0.15, window: float = 1.0, max_wait: float | None = None) -> float:
    """Wait (bounded) until the machine is nearly idle; the busy fraction last seen.

    Other people's tests share this machine's cores; a measurement started
    while they run says more about them than about us. ``max_wait`` defaults
    to $BENCH_QUIET_WAIT seconds, else 90 (0 skips the wait).
    """
    if max_wait is None:
        max_wait = float(os.environ.get("BENCH_QUIET_WAIT", "90"))
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_cpu_seconds()
        time.sleep(window)
        b1, t1 = machine_cpu_seconds()
        busy = (b1 - b0) / max(t1 - t0, 1e-9)
        if busy <= max_busy or time.monotonic() >= deadline:
            if busy > max_busy:
                print(f"(machine still {busy:.0%} busy after waiting {max_wait:.0f} s; measuring anyway)",
                      flush=True)
            return busy


def self_cpu_seconds() -> float:
    """This process's user + system CPU seconds, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_info() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "mem": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def loadavg() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews every number."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def print_machine() -> None:
    m = machine_info()
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem']} RAM, Python {m['python']}, "
          f"Linux {m['kernel']}; load average {loadavg()}; samsara_mp at {library_version()}")


# ------------------------------------------------------------- statistics

def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return float(sorted_values[k])


# ----------------------------------------------------------------- tables

def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (readable as is in a terminal); printed and returned."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        padded = (c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    text = ("\n**" + title + "**\n\n" if title else "") + "\n".join(out)
    print(text, flush=True)
    return text


def save_json(path: str | None, data: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)


# ---------------------------------------------------------------- encoder

def select_encoder(name: str) -> str:
    """Pick samsara_mp's event encoder in this process (forked workers inherit it).

    ``auto`` keeps the library's choice (orjson when the ``fast`` extra is
    installed, else the stdlib C encoder); ``json`` forces the stdlib path, so
    both can be measured from one venv. Returns the encoder in use.
    """
    from samsara_mp import event

    if name == "json":
        event.encode_json = event._stdlib_encode
        return "json (forced)"
    if name == "orjson" and getattr(event, "orjson", None) is None:
        raise SystemExit("orjson is not installed: pip install 'samsara-mp[fast]'")
    return str(getattr(event, "ENCODER_NAME", "json"))


def library_version() -> str:
    """The commit of the library measured, and whether its files had local changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "samsara_mp"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + (" + uncommitted changes in samsara_mp/" if dirty else "")


class ForeignCPU:
    """Share of the machine's CPU used by processes other than ours over a window."""

    def __init__(self, *pids: int | None) -> None:
        self.pids = [p for p in pids if p]
        self._m0, self._own0, self._t0 = 0.0, 0.0, 0.0

    def _own(self) -> float:
        total = self_cpu_seconds()
        for pid in self.pids:
            try:
                total += proc_cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def start(self) -> ForeignCPU:
        self._m0, self._own0, self._t0 = machine_cpu_seconds()[0], self._own(), time.monotonic()
        return self

    def stop(self) -> float:
        busy = machine_cpu_seconds()[0] - self._m0
        own = self._own() - self._own0
        wall = max(time.monotonic() - self._t0, 1e-9)
        return max(0.0, busy - own) / (os.cpu_count() or 1) / wall


def channel_accounting(url: str, channel: str, runtime_dir: str, keys: Sequence[str]
                       ) -> tuple[int | None, dict[str, Any]]:
    """The channel's publisher pid (tracked, to be stopped at exit) and its counters
    ``keys`` (plus ``error`` when it could not be asked), read by a client that
    starts nothing."""
    from samsara_mp import SamsaraClient
    from samsara_mp.channel import Channel
    from samsara_mp.config import Config

    config = Config.build(env={}, url=url, channel=channel, runtime_dir=runtime_dir)
    info = Channel(config).read_info()
    pid = track(int(info["pid"]), "publisher") if info is not None else None
    with SamsaraClient(url, channel=channel, runtime_dir=runtime_dir,
                       start_publishing_thread=False) as probe:
        st = probe.stats()
    chan = st.get("channel") or {}
    out = {k: chan.get(k) for k in keys}
    if st.get("error"):
        out["error"] = st["error"]
    return pid, out


def importable(module: str) -> str | None:
    """Why ``module`` cannot be imported (a baseline's client), or None when it can."""
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None
