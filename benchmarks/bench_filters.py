"""What before_send, sampling and disabled cost per record_event call.

One process, no publisher (``start_publishing_thread=False`` on a channel
nobody publishes, as in bench_record_latency's "none" state), so every row
measures the caller's own work: validation, the optional steps, encoding and
staging. Each row is a fresh client; 1,000 sources round-robin. The modes
run in turn ``--repeat`` times and each row keeps its best run (the least
disturbed by the rest of the machine).

    python benchmarks/bench_filters.py [--calls N] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from samsara_mp import SamsaraClient  # noqa: E402


def _identity(event: dict[str, Any]) -> dict[str, Any]:
    return event


def _redact(event: dict[str, Any]) -> dict[str, Any]:
    event.pop("payload", None)
    return event


def _drop(event: dict[str, Any]) -> None:
    return None


MODES: list[tuple[str, dict[str, Any]]] = [
    ("plain (none of them on)", {}),
    ("before_send: identity", {"before_send": _identity}),
    ("before_send: pop a key", {"before_send": _redact}),
    ("before_send: drop all (filtered)", {"before_send": _drop}),
    ("sample_rate=0.5", {"sample_rate": 0.5}),
    ("sample_rate=0.0 (all sampled out)", {"sample_rate": 0.0}),
    ("sample_rate=0.5 + before_send: pop", {"sample_rate": 0.5, "before_send": _redact}),
    ("disabled", {"disabled": True}),
]


def measure(settings: dict[str, Any], calls: int, runtime: str, index: int) -> dict[str, Any]:
    client = SamsaraClient(url="http://127.0.0.1:9/", runtime_dir=runtime, channel=f"bf{index}",
                           start_publishing_thread=False, ipc_timeout=100, **settings)
    rec = client.record_event
    pc = time.perf_counter_ns
    sources = [f"user-{i}" for i in range(1000)]
    lat = array("q", bytes(8 * calls))
    payload = C.PAYLOAD
    for i in range(calls):
        sid = sources[i % 1000]
        t0 = pc()
        rec(eventName=C.EVENT_NAME, sourceId=sid, seq=i, payload=payload)
        lat[i] = pc() - t0
    local = client.stats()["local"]
    client.close(timeout=0.1)
    s = sorted(lat)
    return {"p50_us": C.percentile(s, 50) / 1000, "p99_us": C.percentile(s, 99) / 1000,
            "mean_us": sum(s) / len(s) / 1000, "recorded": local["recorded"],
            "left_out": local["filtered"] + local["sampled_out"] + local["disabled"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    C.print_machine()
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bf-", dir="/tmp") as runtime:
        for round_ in range(args.repeat):
            for index, (name, settings) in enumerate(MODES):
                run = measure(settings, args.calls, runtime, round_ * len(MODES) + index)
                if name not in best or run["mean_us"] < best[name]["mean_us"]:
                    best[name] = {"mode": name, **run}
    results = [best[name] for name, _ in MODES]
    C.table(
        ["mode", "calls", "p50 µs", "p99 µs", "mean µs", "recorded", "left out"],
        [[r["mode"], args.calls, r["p50_us"], r["p99_us"], r["mean_us"], r["recorded"], r["left_out"]]
         for r in results],
        title=f"record_event with before_send / sample_rate / disabled ({C.library_version()})",
    )
    C.save_json(args.json, results)


if __name__ == "__main__":
    main()
