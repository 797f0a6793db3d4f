"""The stdlib encoder's key check, in use against the form it replaced (issue #10, item 5).

Before encoding, ``_stdlib_encode`` looks for nested mappings whose keys would
collide as JSON names. The replaced form walked every value with
``isinstance`` and tested each nested dict's keys with ``all(<generator>)``;
the form in use skips the walk when every value is of a plain type (one
C-level pass) and tests keys with a loop. Both are timed in this process,
interleaved, best of ``--repeat`` x ``--number`` calls, on the benchmarks'
flat event and on one with a small nested ``props`` dict.

    python benchmarks/bench_encode_check.py [--number 200000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from samsara_mp import event  # noqa: E402

_CONTAINERS = (dict, list, tuple)


def _replaced_check(value: Any) -> None:
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            event._refuse_duplicate_keys(value)
        for v in value.values():
            if isinstance(v, _CONTAINERS):
                _replaced_check(v)
    else:
        for v in value:
            if isinstance(v, _CONTAINERS):
                _replaced_check(v)


def replaced(ev: dict[str, Any]) -> bytes:
    for value in ev.values():
        if isinstance(value, _CONTAINERS):
            _replaced_check(value)
    return event._stdlib_fast(ev)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--number", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    flat = {"eventName": C.EVENT_NAME, "seq": 12345, "payload": C.PAYLOAD,
            "timestamp": 1_700_000_000_000, "sourceId": "w1"}
    nested = dict(flat, props={"plan": "pro", "items": 3, "ok": True})
    print(f"python {sys.version.split()[0]}; µs per call, best of {args.repeat} x {args.number:,}")
    for name, ev in (("flat event", flat), ("nested props", nested)):
        assert replaced(ev) == event._stdlib_encode(ev)
        best = {"replaced": float("inf"), "in use": float("inf")}
        for _ in range(args.repeat):  # interleaved, so drift hits both
            for label, fn in (("replaced", replaced), ("in use", event._stdlib_encode)):
                t = timeit.timeit(lambda fn=fn, ev=ev: fn(ev), number=args.number) / args.number * 1e6
                best[label] = min(best[label], t)
        print(f"  {name:13s} replaced {best['replaced']:.3f}   in use {best['in use']:.3f}   "
              f"saved {best['replaced'] - best['in use']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
