"""Why a single fast worker drops events with a healthy publisher: push size and round trip.

One process records N events back to back (publisher healthy, reference
server online) with the default ``staging_size``; the worker's pushes to the
publisher are timed by wrapping ``Connection.call`` in this process.
Printed: pushes, events per push, push round-trip percentiles, staging drops.
Two what-ifs that change nothing in the library's files, only this process:

``--sndbuf BYTES``     set SO_SNDBUF on the worker's IPC socket (default
                       Linux limit for a Unix socket is ~208 KiB, so a push of
                       thousands of events takes several write()s, and each
                       later write() must win the GIL back from the recording
                       thread: up to ``sys.getswitchinterval()`` each);
``--switchinterval S`` ``sys.setswitchinterval(S)`` in the worker.

    python benchmarks/diag_push_rtt.py [--calls 200000] [--sndbuf 4194304] [--switchinterval 0.001]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from samsara_mp import (  # noqa: E402
    Publisher,
    SamsaraClient,
    ipc,  # noqa: E402
)
from samsara_mp import channel as channel_mod  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--sndbuf", type=int, default=0)
    ap.add_argument("--switchinterval", type=float, default=0.0)
    ap.add_argument("--encoder", choices=("auto", "json", "orjson"), default="auto")
    args = ap.parse_args()
    C.install_cleanup()
    C.print_machine()
    print(f"encoder {C.select_encoder(args.encoder)}; switch interval "
          f"{args.switchinterval or sys.getswitchinterval()} s; SO_SNDBUF {args.sndbuf or 'default'}")
    if args.switchinterval:
        sys.setswitchinterval(args.switchinterval)

    log: list[tuple[float, float, int]] = []
    orig_call = ipc.Connection.call

    def timed_call(self: Any, method: str, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        result = orig_call(self, method, *a, **kw)
        if method == "push":
            log.append((t0, time.perf_counter() - t0, len(a[0])))
        return result

    ipc.Connection.call = timed_call  # type: ignore[method-assign]
    if args.sndbuf:
        orig_connect = channel_mod.Channel.connect

        def connect(self: Any, timeout: float) -> Any:
            conn = orig_connect(self, timeout)
            s = socket.socket(fileno=conn.fileno())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
            s.detach()
            return conn

        channel_mod.Channel.connect = connect  # type: ignore[method-assign]

    rundir = tempfile.mkdtemp(prefix="bd-", dir="/tmp")
    srv = C.IngestProcess()
    try:
        pub = Publisher(url=srv.url, channel="diag", runtime_dir=rundir, publish_interval=100,
                        min_buffer_size=1, max_buffer_size=2_000_000).start()
        assert pub.pid is not None
        C.track(pub.pid, "publisher")
        c = SamsaraClient(url=srv.url, sourceId="w1", channel="diag", runtime_dir=rundir)
        for i in range(10_000):
            c.record_event(eventName=C.EVENT_NAME, seq=i, payload=C.PAYLOAD)
        c.ship(5.0)
        log.clear()
        C.wait_quiet()
        t = time.perf_counter()
        for i in range(args.calls):
            c.record_event(eventName=C.EVENT_NAME, seq=i, payload=C.PAYLOAD)
        wall = time.perf_counter() - t
        dropped = c._staging.dropped
        c.close(10.0)
        pub.stop()
        C.untrack(pub.pid)
    finally:
        srv.stop()
    inside = [x for x in log if x[0] < t + wall]
    rtts = sorted(x[1] * 1000 for x in inside)
    sizes = sorted(x[2] for x in inside)
    print(f"{args.calls:,} calls in {wall:.2f} s ({args.calls / wall:,.0f}/s); staging drops {dropped:,} "
          f"({dropped / args.calls:.0%}); pushes during recording {len(inside)}")
    if rtts:
        print(f"push round trip ms: p50 {C.percentile(rtts, 50):.1f}, p90 {C.percentile(rtts, 90):.1f}, "
              f"max {rtts[-1]:.1f}; events per push: p50 {C.percentile(sizes, 50):,.0f}, "
              f"max {sizes[-1]:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
