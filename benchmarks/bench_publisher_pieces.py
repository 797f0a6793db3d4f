"""The publisher's per-batch work, piece by piece, against the form each replaced.

One batch as the publisher builds it: ``max_batch_size`` (5,000) events of the
benchmarks' shape (145 B encoded). For each piece, the CPU time of this process
(best of ``--repeat`` runs of ``--calls`` calls) and the minor page faults per
call, for the code in use and for the form it replaced:

- ``join``: ``transport.join_events`` (one allocation) against
  ``b"[" + b",".join(p) + b"]"`` (three batch-sized objects);
- ``commit``: ``Ring.take`` + ``settle`` of a whole batch delivered,
  against the same with the index sets and the size pass built (``commit_sets``);
- ``POST``: ``Transport.post`` (request prepared once) against
  ``session.post(...)`` with the same headers and body, to the reference
  server on 127.0.0.1 (its CPU is not counted), one event per POST so that
  the fixed cost shows.

    python benchmarks/bench_publisher_pieces.py [--repeat 7] [--calls 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from samsara_mp.config import Config  # noqa: E402
from samsara_mp.event import EventEncoder  # noqa: E402
from samsara_mp.helpers import current_time_millis  # noqa: E402
from samsara_mp.ring import Ring  # noqa: E402
from samsara_mp.transport import (  # noqa: E402
    PUBLISHED_TIMESTAMP_HEADER,
    HTTPAnswer,
    Transport,
    _Deadline,
    join_events,
)


def _measure(fns: list[Callable[[], Any]], repeat: int, calls: int) -> list[tuple[float, float]]:
    """For each function, the best CPU µs per call and the minor faults per call in
    that best run; the functions' runs alternate, so that drift hits them alike."""
    best = [(float("inf"), 0.0)] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.process_time()
            for _ in range(calls):
                fn()
            cpu = (time.process_time() - t0) / calls * 1e6
            if cpu < best[k][0]:
                best[k] = (cpu, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / calls)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    C.install_cleanup()
    C.print_machine()
    n = Config.max_batch_size
    encoder = EventEncoder("bench-source", Config.max_event_bytes)
    payloads = [encoder.encode_owned({"eventName": C.EVENT_NAME, "seq": i, "payload": C.PAYLOAD,
                                      "timestamp": 1_764_700_000_000 + i}) for i in range(n)]
    rows: list[list[Any]] = []

    def pair(piece: str, forms: list[tuple[str, Callable[[], Any]]], calls: int) -> None:
        C.wait_quiet()
        for (form, _), (cpu, faults) in zip(forms, _measure([f for _, f in forms], args.repeat, calls),
                                            strict=True):
            rows.append([piece, form, C.fmt(cpu, 0), C.fmt(cpu / n, 3), C.fmt(faults, 1)])

    pair("join", [("join_events (in use)", lambda: join_events(payloads)),
                  ('b"[" + b",".join(p) + b"]" (before)', lambda: b"[" + b",".join(payloads) + b"]")],
         args.calls)

    buf = Ring(max_size=4 * n)

    def commit(sets: bool) -> None:
        buf.push(payloads)
        batch = buf.take(n, 10**9)
        assert batch is not None
        if sets:  # the work the whole-batch path did before: two index sets, a size pass
            delivered = set(range(n))
            settled = delivered | set()
            assert len(settled) == n and sum(map(len, batch.payloads)) == batch.nbytes
        buf.settle(batch, range(n), ())

    pair("commit", [("take + settle, whole batch (in use)", lambda: commit(False)),
                    ("take + settle + index sets and size pass (before)", lambda: commit(True))],
         args.calls)

    srv = C.IngestProcess()
    try:
        transport = Transport(srv.url.rstrip("/") + "/v1/events", 10.0)
        one = [payloads[0]]
        body = transport.encode(one)

        def old_post() -> None:  # Transport.post before the template, line for line
            headers = dict(transport._headers)
            headers[PUBLISHED_TIMESTAMP_HEADER] = str(current_time_millis())
            deadline = _Deadline(transport.timeout[1])
            try:
                resp = transport.session.post(transport.endpoint, data=body.data, headers=headers,
                                              timeout=transport.timeout, allow_redirects=False)
                content = resp.content
            finally:
                deadline.cancel()
            answer = HTTPAnswer(resp.status_code, dict(resp.headers), content, body.raw_bytes, len(body.data))
            assert answer.status < 300

        def new_post() -> None:
            assert transport.post(one, body).status < 300

        for _ in range(20):  # connections open, caches warm
            new_post()
            old_post()
        pair("POST", [("Transport.post, prepared once (in use)", new_post),
                      ("session.post (before)", old_post)], max(args.calls * 4, 50))
        transport.close()
    finally:
        srv.stop()
    title = f"the publisher's per-batch pieces (best of {args.repeat} x {args.calls} calls)"
    print(C.table(["piece", "form", "CPU µs per call", "µs per event (5,000/batch)", "minor faults per call"],
                  rows, title=title))
    C.save_json(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
