"""Compressing one batch: zlib against ISA-L (the "fast" extra), on the benchmark's events.

One batch as the publisher builds it: ``max_batch_size`` (5,000) events of the
benchmarks' shape (``eventName="bench.event", seq=i, payload="x"*50``, 145 B
encoded), joined into one JSON array. For each compressor and level it times
``samsara_mp.transport.gzip_bytes`` (best of 7 repeats of 20 calls, CPU time
of this process) and reports µs per event, MB/s of JSON in, and the output
size. No processes and no network.

    python benchmarks/bench_compression.py
"""

from __future__ import annotations

import gzip
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from samsara_mp.config import Config  # noqa: E402
from samsara_mp.event import EventEncoder  # noqa: E402
from samsara_mp.transport import _isal_zlib, gzip_bytes, join_events  # noqa: E402

REPEATS, CALLS = 7, 20


def _zlib(data: bytes, level: int) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


def _cpu_per_call(fn: object, data: bytes) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.process_time()
        for _ in range(CALLS):
            fn(data)  # type: ignore[operator]
        best = min(best, (time.process_time() - t0) / CALLS)
    return best


def main() -> int:
    C.print_machine()
    n = Config.max_batch_size
    encoder = EventEncoder("bench-source", Config.max_event_bytes)
    start = 1_764_700_000_000
    payloads = [encoder.encode_owned({"eventName": C.EVENT_NAME, "seq": i, "payload": C.PAYLOAD,
                                      "timestamp": start + i}) for i in range(n)]
    body = join_events(payloads)
    print(f"one batch: {n:,} events, {len(body):,} bytes of JSON; isal installed: {_isal_zlib() is not None}")
    rows = []
    cases: list[tuple[str, object]] = [(f"zlib level {lv}", (lambda d, lv=lv: _zlib(d, lv))) for lv in (1, 6)]
    if _isal_zlib() is not None:
        cases.append(("gzip_bytes level 1 (ISA-L)", lambda d: gzip_bytes(d, 1)))
    for name, fn in cases:
        out = fn(body)  # type: ignore[operator]
        assert gzip.decompress(out) == body
        cpu = _cpu_per_call(fn, body)
        rows.append([name, f"{cpu * 1e6 / n:.3f}", f"{len(body) / cpu / 1e6:,.0f}", f"{len(out):,}",
                     f"{len(body) / len(out):.1f}"])
    C.table(["compressor", "CPU µs per event", "MB/s in", "bytes out", "ratio"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
