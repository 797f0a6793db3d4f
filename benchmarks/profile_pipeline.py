"""Where the time goes: py-spy on a worker, the publisher and the server during a throughput run.

Runs the bench_throughput.py scenario (N forked workers -> publisher ->
reference server, store=count) with ``py-spy record --format raw
--nonblocking`` attached to worker 0, the publisher and the server, then
prints each process's hottest functions and lines (share of samples, self
and inclusive). Also times the pieces of ``record_event`` in isolation
(``--micro``). Needs ``py-spy`` in the venv (``pip install py-spy``) and
ptrace permission.

    python benchmarks/profile_pipeline.py [--workers 8] [--per 150000] [--micro]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_throughput as BT  # noqa: E402

from samsara_mp import Publisher  # noqa: E402

_LINE = re.compile(r":(\d+)\)$")


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(exe):
        raise SystemExit("py-spy not found: pip install py-spy")
    return exe


def start_spy(pid: int, out: str, rate: int, seconds: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
         "--nonblocking", "--threads", "--duration", str(int(seconds)), "-o", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    C.track(proc.pid, "py-spy")
    return proc


def _short(frame: str) -> str:
    frame = frame.replace(str(C.ROOT) + "/", "")
    return re.sub(r"\(/.*?/(site-packages|lib/python3\.\d+)/", r"(", frame)


def summarise(path: str, top: int, label: str) -> list[str]:
    """Top functions (self, inclusive) and lines (self) from py-spy's collapsed stacks."""
    self_fn: collections.Counter[str] = collections.Counter()
    incl_fn: collections.Counter[str] = collections.Counter()
    self_line: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for raw in f:
            stack, _, count = raw.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            frames = frames[1:]  # the first frame names the thread
            if not frames:
                continue
            total += n
            role = "shipper" if any("_ship_loop" in fr for fr in frames) else (
                "publish loop" if any("publish_loop.py" in fr and "_run" in fr for fr in frames) else
                "ipc server" if any("_serve_client" in fr for fr in frames) else
                "main" if any(k in fr for fr in frames for k in ("<module>", "w_samsara_mp", "w_sized"))
                else "other")
            threads[role] += n
            fns = [_LINE.sub(")", _short(fr)) for fr in frames]
            self_fn[fns[-1]] += n
            self_line[_short(frames[-1])] += n
            for fn in set(fns):
                incl_fn[fn] += n
    out = [f"\n### {label}: {total:,} samples"]
    if not total:
        return out
    out.append("threads: " + ", ".join(f"{k} {v / total:.0%}" for k, v in threads.most_common()))
    out.append("\nself time by function:")
    out += [f"  {v / total:6.1%}  {k}" for k, v in self_fn.most_common(top)]
    out.append("inclusive time by function:")
    out += [f"  {v / total:6.1%}  {k}" for k, v in incl_fn.most_common(top)]
    out.append("self time by line:")
    out += [f"  {v / total:6.1%}  {k}" for k, v in self_line.most_common(top)]
    return out


def micro() -> list[str]:
    """Each piece of record_event, timed alone in this process (µs per call)."""
    import json
    import threading
    from collections import deque

    from samsara_mp import event
    from samsara_mp.event import EventEncoder
    from samsara_mp.helpers import current_time_millis

    enc = EventEncoder("w1", 65536)
    ev = {"eventName": C.EVENT_NAME, "seq": 12345, "payload": C.PAYLOAD}
    full = dict(ev, timestamp=current_time_millis(), sourceId="w1")
    lock, dq = threading.Lock(), deque()

    def noop(**kw: Any) -> None:
        pass

    def staged(b: bytes) -> None:
        with lock:
            if len(dq) >= 10_000:
                dq.popleft()
            dq.append(b)

    cases: dict[str, Any] = {
        "call with 3 kwargs (caller's dict)":
            lambda: noop(eventName=C.EVENT_NAME, seq=12345, payload=C.PAYLOAD),
        "current_time_millis()": current_time_millis,
        f"event.encode_json (in use: {event.ENCODER_NAME})": lambda: event.encode_json(full),
        "event._stdlib_encode (prebuilt C encoder)": lambda: event._stdlib_encode(full),
        "json.dumps(separators) + .encode()": lambda: json.dumps(full, separators=(",", ":")).encode(),
        "EventEncoder.encode_owned(dict(ev))": lambda: enc.encode_owned(dict(ev)),
        "dict(ev) alone": lambda: dict(ev),
        "lock + bounded deque append": lambda: staged(b"x"),
    }
    if getattr(event, "orjson", None) is not None:
        cases["orjson.dumps alone"] = lambda: event.orjson.dumps(full)
    out = ["\n### record_event pieces, timed alone (µs per call, best of 5 x 200k)"]
    for name, fn in cases.items():
        best = min(timeit.repeat(fn, number=200_000, repeat=5)) / 200_000 * 1e6
        out.append(f"  {best:6.3f}  {name}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--per", type=int, default=150_000, help="events per worker")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples/s")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--size", type=int, default=None,
                    help="encoded event size in bytes (word payload, as bench_scaling.py); "
                         "default: the 145 B benchmark event")
    ap.add_argument("--keep", default=None, help="directory to keep the raw py-spy files in")
    ap.add_argument("--encoder", choices=("auto", "json", "orjson"), default="auto",
                    help="samsara_mp's event encoder: the library's choice, or force one")
    args = ap.parse_args()
    print(f"samsara_mp event encoder: {C.select_encoder(args.encoder)}")
    C.install_cleanup()
    C.print_machine()
    rundir = tempfile.mkdtemp(prefix="bp-", dir="/tmp")
    outdir = args.keep or rundir
    os.makedirs(outdir, exist_ok=True)
    srv = C.IngestProcess()
    lines: list[str] = []
    try:
        pub = Publisher(url=srv.url, channel="prof", runtime_dir=rundir, publish_interval=100,
                        min_buffer_size=1, max_buffer_size=2_000_000).start()
        assert pub.pid is not None
        C.track(pub.pid, "publisher")
        C.wait_quiet()  # before the workers and py-spy start their clocks
        ctx = BT.CTX
        ready, start, res = ctx.Queue(), ctx.Event(), ctx.Queue()
        opts = {"url": srv.url, "channel": "prof", "rundir": rundir, "staging": args.per}
        target = BT.w_samsara_mp
        if args.size:
            import bench_scaling

            opts["pool"] = bench_scaling.payload_pool(args.size)
            target = bench_scaling.w_sized
        procs = [ctx.Process(target=target, args=(i, args.per, opts, ready, start, res),
                             daemon=True) for i in range(args.workers)]
        for p in procs:
            p.start()
            C.track(p.pid, "worker")
        for _ in procs:
            ready.get(timeout=60)
        budget = 60.0
        targets = {"worker 0": procs[0].pid, "publisher": pub.pid, "server": srv.pid}
        spies = {k: (start_spy(pid, f"{outdir}/{k.replace(' ', '')}.txt", args.rate, budget),
                     f"{outdir}/{k.replace(' ', '')}.txt") for k, pid in targets.items()}
        time.sleep(1.0)  # let py-spy attach
        base = srv.accepted()
        t0 = time.time()
        start.set()
        expected = args.workers * args.per
        seen, t1 = srv.wait_accepted(base + expected, budget - 5)
        lines.append(f"\n{args.workers} workers x {args.per:,} events: {seen - base:,} delivered in "
                     f"{t1 - t0:.2f} s = {(seen - base) / (t1 - t0):,.0f} events/s (under py-spy)")
        for proc, _ in spies.values():
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc, _ in spies.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                C.stop_pid(proc.pid)
            C.untrack(proc.pid)
        for p in procs:
            p.join(10)
            if p.is_alive():
                C.stop_pid(p.pid)
            C.untrack(p.pid)
        pub.stop()
        C.untrack(pub.pid)
        for label, (_, path) in spies.items():
            if os.path.exists(path):
                lines += summarise(path, args.top, label)
            else:
                lines.append(f"\n### {label}: py-spy wrote nothing")
    finally:
        srv.stop()
    if args.micro:
        lines += micro()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
