"""``record_event`` in an async handler: its cost, and its effect on request latency.

A Starlette app under ``uvicorn`` (one worker, samsara_mp's ``lifespan=``)
answers ``/noop`` and ``/record`` (which records one event and reports how
long ``record_event`` took, by ``perf_counter_ns``). One keep-alive client
alternates the two, so drift in the machine's load hits both alike; the
tables give the client-seen latency of each and the in-handler time of
``record_event``. Everything it starts (reference server, uvicorn, the
publisher uvicorn's worker elects) is stopped by pid.

    python benchmarks/bench_async_handler.py [--requests N] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

try:  # the app half: imported by uvicorn in its worker
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - the driver half needs no starlette
    Starlette = None  # type: ignore[assignment,misc]

if Starlette is not None:
    from samsara_mp import get_client
    from samsara_mp.integrations.asgi import lifespan

    async def noop(request: Request) -> PlainTextResponse:
        return PlainTextResponse("0")

    async def record(request: Request) -> PlainTextResponse:
        client = get_client()
        t0 = time.perf_counter_ns()
        client.record_event(eventName="bench.async", path="/record", n=1)
        return PlainTextResponse(str(time.perf_counter_ns() - t0))

    app = Starlette(routes=[Route("/noop", noop), Route("/record", record)],
                    lifespan=functools.partial(lifespan, sourceId="bench-async"))


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as c

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3_000, help="requests per route (default 3000)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    c.install_cleanup()
    c.print_machine()
    runtime = tempfile.mkdtemp(prefix="smp-bench-", dir="/tmp")
    with c.IngestProcess() as api:
        port = _free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(c.ROOT), str(c.BENCH_DIR)]),
                   SAMSARA_MP_URL=api.url, SAMSARA_MP_RUNTIME_DIR=runtime)
        server = subprocess.Popen(
            [c.PY, "-m", "uvicorn", "--port", str(port), "--no-access-log", "--log-level", "warning",
             "bench_async_handler:app"], env=env, cwd=c.BENCH_DIR,
        )
        c.track(server.pid, "uvicorn")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def get(path: str) -> tuple[float, int]:
            t0 = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            return time.perf_counter() - t0, int(body)

        def up() -> bool:
            try:
                get("/noop")
                return True
            except OSError:
                conn.close()
                return False

        if not c.wait_until(up, 30):
            raise SystemExit("uvicorn did not answer")
        for _ in range(300):
            get("/noop")
            get("/record")
        c.wait_quiet()
        lat: dict[str, list[float]] = {"/noop": [], "/record": []}
        inside: list[float] = []
        for _ in range(args.requests):
            for path in ("/noop", "/record"):
                seconds, ns = get(path)
                lat[path].append(seconds * 1e6)
                if path == "/record":
                    inside.append(ns / 1000)
        conn.close()
        recorded = 300 + args.requests
        n, _ = api.wait_accepted(recorded, 30)
        server.terminate()
        server.wait(30)
        c.untrack(server.pid)
        for root, _dirs, files in os.walk(runtime):
            if "publisher.json" in files:
                with open(os.path.join(root, "publisher.json")) as f:
                    c.stop_pid(int(json.load(f)["pid"]))
    rows = []
    for name, values in (("GET /noop (client-seen)", lat["/noop"]),
                         ("GET /record (client-seen)", lat["/record"]),
                         ("record_event in the handler", inside)):
        values.sort()
        rows.append([name, *(c.fmt(c.percentile(values, p)) for p in (50, 90, 99, 99.9))])
    title = f"{args.requests} requests per route, one keep-alive client; delivered {n:,}/{recorded:,}"
    c.table(["µs", "p50", "p90", "p99", "p99.9"], rows, title=title)  # prints it
    c.save_json(args.json, {"latency_us": lat, "record_event_us": inside, "delivered": n})
    return 0 if n == recorded else 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
