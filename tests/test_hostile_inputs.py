"""200 malformed or hostile inputs to record_event: each refused clearly or converted as documented.

Documented conversions (those of JSON itself): tuples become lists, and
int/float/bool/None keys of nested mappings become strings. Everything else
that JSON cannot carry raises ``InvalidEvent`` naming the field, in the caller,
and never reaches the publisher.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import random
import uuid
from typing import Any

from samsara_mp import InvalidEvent, Publisher, SamsaraClient
from samsara_mp.ingest import IngestServer


class Color(enum.Enum):
    RED = 1


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")

    def __str__(self) -> str:
        raise RuntimeError("str exploded")


class BadEq(dict):  # type: ignore[type-arg]
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq exploded")

    __hash__ = None  # type: ignore[assignment]


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"d": value}
    return value


def _cases() -> list[dict[str, Any]]:
    rng = random.Random(20261123)
    hostile_values: list[Any] = [
        b"bytes", bytearray(b"x"), memoryview(b"m"), float("nan"), float("inf"), -float("inf"),
        datetime.datetime.now(), datetime.date.today(), decimal.Decimal("1.5"), uuid.uuid4(),
        {1, 2}, frozenset(), object(), BadRepr(), Color.RED, complex(1, 2), type, print,
        _nested(5_000), "\udc80", ["ok", b"no"], {"k": float("nan")}, {(1, 2): "tuple key"},
        {"k": {"kk": object()}}, iter([]), range(3), Ellipsis, NotImplemented,
    ]
    cases: list[dict[str, Any]] = []
    for value in hostile_values:
        cases.append({"eventName": "hostile", "value": value})
    for bad_name in [None, "", 0, 1.5, b"name", ["x"], {"a": 1}, True, BadRepr(), "x" * 70_000]:
        cases.append({"eventName": bad_name})
    for bad_ts in [-1, -(2**70), 1.0, "1", b"1", True, False, None.__class__, decimal.Decimal(3), [1]]:
        cases.append({"eventName": "e", "timestamp": bad_ts})
    for bad_source in ["", 5, b"s", ["s"], {"s": 1}, True, 0.5]:
        cases.append({"eventName": "e", "sourceId": bad_source})
    # Documented conversions and plain valid events, mixed with random hostile ones.
    conversions: list[dict[str, Any]] = [
        {"eventName": "conv", "t": (1, 2, 3)},
        {"eventName": "conv", "m": {1: "int key", 2.5: "float key", None: "none"}},
        {"eventName": "conv", "b": {True: "bool key"}},
        {"eventName": "ok", "huge": "y" * 60_000},
        {"eventName": "ok", "deep": _nested(100)},
        {"eventName": "ok", "uni": "日本語 ✓ \u2028 \x00"},
        {"eventName": "ok", "big": 2**200, "neg": -(2**63)},
    ]
    cases.extend(conversions)
    while len(cases) < 200:
        value = rng.choice(hostile_values)
        key = rng.choice(["a", "b", "nested"])
        wrapped = [1, {"x": value}] if rng.random() < 0.5 else value
        cases.append({"eventName": f"mix{len(cases)}", key: wrapped})
    return cases[:200]


def test_two_hundred_hostile_inputs_are_refused_or_converted_and_none_reach_the_publisher(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    cases = _cases()
    assert len(cases) == 200
    accepted: list[dict[str, Any]] = []
    refused = 0
    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config) as client:
            for i, event in enumerate(cases):
                try:
                    client.record_event(**dict(event, case=i))
                except InvalidEvent as exc:
                    refused += 1
                    assert exc.field and exc.reason, exc
                    text = str(exc)
                    assert text.startswith("invalid event: ") and len(text) < 400
                else:
                    accepted.append(dict(event, case=i))
            assert client.flush(timeout=30)
        stats = pub.stats()
    assert refused >= 150
    assert stats["recorded"] == len(accepted) == stats["delivered"]
    got = {e["case"]: e for e in server.events()}
    assert sorted(got) == [e["case"] for e in accepted]
    for event in accepted:
        sent = json.loads(json.dumps(event))  # JSON's own conversions
        received = {k: v for k, v in got[event["case"]].items() if k in sent}
        assert received == sent
