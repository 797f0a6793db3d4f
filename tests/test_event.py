"""Event validation, enrichment and encoding in the caller."""

from __future__ import annotations

import datetime
import json
import logging
import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samsara_mp import InvalidEvent, SamsaraClient
from samsara_mp import event as event_module
from samsara_mp.event import MAX_TIMESTAMP, EventEncoder


@pytest.fixture(autouse=True, params=["stdlib", "orjson"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test with both encoders: what is refused must not depend on the install."""
    if request.param == "stdlib":
        monkeypatch.setattr(event_module, "encode_json", event_module._stdlib_encode)
    else:
        assert event_module.orjson is not None, "the test extra installs orjson"
        monkeypatch.setattr(event_module, "encode_json", event_module._orjson_encode)
    return str(request.param)


def enc(**event: Any) -> dict[str, Any]:
    data = EventEncoder("cfg-source", 64 * 1024, now=lambda: 1234).encode_owned(event)
    decoded: dict[str, Any] = json.loads(data)
    return decoded


def test_missing_source_and_timestamp_are_filled_in() -> None:
    assert enc(eventName="e") == {"eventName": "e", "timestamp": 1234, "sourceId": "cfg-source"}


def test_given_source_and_zero_timestamp_are_kept() -> None:
    assert enc(eventName="e", sourceId="d1", timestamp=0) == {
        "eventName": "e", "sourceId": "d1", "timestamp": 0,
    }


def test_encoding_is_compact_utf8_json() -> None:
    data = EventEncoder("s", 1024, now=lambda: 1).encode_owned({"eventName": "é", "a": [1, 2]})
    assert data == '{"eventName":"é","a":[1,2],"timestamp":1,"sourceId":"s"}'.encode()


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


circular: list[Any] = []
circular.append(circular)

deep: Any = []
for _ in range(100_000):
    deep = [deep]

INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({}, "eventName", "missing"),
    ({"eventName": ""}, "eventName", "empty"),
    ({"eventName": 5}, "eventName", "must be a string"),
    ({"eventName": None}, "eventName", "missing"),
    ({"eventName": b"bytes"}, "eventName", "must be a string"),
    ({"eventName": "e", "timestamp": -1}, "timestamp", ">= 0"),
    ({"eventName": "e", "timestamp": 1.5}, "timestamp", "integer"),
    ({"eventName": "e", "timestamp": True}, "timestamp", "integer"),
    ({"eventName": "e", "timestamp": "123"}, "timestamp", "integer"),
    ({"eventName": "e", "timestamp": Decimal(1)}, "timestamp", "integer"),
    ({"eventName": "e", "sourceId": ""}, "sourceId", "empty"),
    ({"eventName": "e", "sourceId": 7}, "sourceId", "must be a string"),
    ({"eventName": "e", "x": float("nan")}, "x", "nan"),
    ({"eventName": "e", "x": float("inf")}, "x", "inf"),
    ({"eventName": "e", "x": [1.0, -math.inf]}, "x", "nan or infinity"),
    ({"eventName": "e", "x": object()}, "x", "not json-serialisable"),
    ({"eventName": "e", "x": b"raw"}, "x", "not json-serialisable"),
    ({"eventName": "e", "x": {1, 2}}, "x", "not json-serialisable"),
    ({"eventName": "e", "x": datetime.datetime(2020, 1, 1)}, "x", "not json-serialisable"),
    ({"eventName": "e", "x": Unrepresentable()}, "x", "not json-serialisable"),
    ({"eventName": "e", "x": circular}, "x", "circular"),
    ({"eventName": "e", "x": deep}, "x", "nested too deeply"),
    ({"eventName": "e", "x": {(1, 2): "tuple key"}}, "x", "not json-serialisable"),
    ({"eventName": "e", "x": "\ud800"}, "x", "surrogate"),
    ({"eventName": "e", "x": "y" * 70_000}, "event", "whole event: "),
    ({"eventName": "e" * 70_000}, "event", "whole event: "),
]


@pytest.mark.parametrize(("event", "field", "reason"), [
    *INVALID, ({"eventName": "e", "timestamp": 2**63}, "timestamp", "9999"), ({"eventName": "e"}, "", ""),
])
def test_the_fused_hot_path_and_enrich_then_encode_enriched_agree(
    event: dict[str, Any], field: str, reason: str
) -> None:
    # encode_owned inlines enrich() + encode_enriched() (a call pair costs ~0.2 us of
    # ~1.8); the three are kept in step by this test, not by reading them side by side.
    fixed_now = 1_700_000_000_000
    enc = EventEncoder("s", 64 * 1024, now=lambda: fixed_now)

    def fused() -> bytes:
        return enc.encode_owned(dict(event))

    def split() -> bytes:
        copy = dict(event)
        enc.enrich(copy)
        return enc.encode_enriched(copy)

    outcomes = []
    for path in (fused, split):
        try:
            outcomes.append(("ok", path()))
        except InvalidEvent as exc:
            outcomes.append(("refused", f"{exc.field}: {exc.reason}"))
    assert outcomes[0] == outcomes[1]
    if field:
        assert outcomes[0][0] == "refused" and outcomes[0][1].startswith(field)


@pytest.mark.parametrize(("event", "field", "reason"), INVALID)
def test_invalid_events_name_the_field_and_reason(event: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        EventEncoder("s", 64 * 1024).encode(event)
    assert info.value.field == field
    assert reason in str(info.value).lower()


def test_missing_source_without_configured_one_is_refused() -> None:
    with pytest.raises(InvalidEvent) as info:
        EventEncoder(None, 1024).encode({"eventName": "e"})
    assert info.value.field == "sourceId"


def test_publish_events_names_the_index_of_the_bad_event(runtime_dir: str) -> None:
    client = SamsaraClient(url="http://127.0.0.1:9/", sourceId="s", runtime_dir=runtime_dir,
                           start_publishing_thread=False)
    with pytest.raises(InvalidEvent) as info:
        client.publish_events([{"eventName": "ok"}, {"eventName": "e", "timestamp": -5}])
    assert info.value.field == "events[1].timestamp"
    client.close()


def test_record_event_refuses_without_staging_anything(runtime_dir: str) -> None:
    client = SamsaraClient(url="http://127.0.0.1:9/", sourceId="s", runtime_dir=runtime_dir,
                           start_publishing_thread=False)
    with pytest.raises(InvalidEvent):
        client.record_event(eventName="e", bad=float("nan"))
    client.record_event(eventName="e", good=1)
    local = client.stats()["local"]
    assert local["recorded"] == 1 and local["staged"] == 1
    # Nothing can ship (there is no server on port 9): close gives the event up, counted.
    assert client.close(timeout=0.1) is False
    assert client.stats()["local"]["discarded"] == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(min_size=1),
    source=st.text(min_size=1),
    ts=st.integers(min_value=0, max_value=MAX_TIMESTAMP),
    props=st.dictionaries(
        st.text().filter(lambda k: k not in ("eventName", "sourceId", "timestamp")), json_values,
        max_size=6,
    ),
)
def test_any_json_event_round_trips(name: str, source: str, ts: int, props: dict[str, Any]) -> None:
    event = dict(props, eventName=name, sourceId=source, timestamp=ts)
    try:
        data = EventEncoder(None, 10**9).encode(event)
    except InvalidEvent as exc:
        # Only text that is not valid Unicode may be refused.
        assert "surrogate" in str(exc)
        return
    assert json.loads(data) == event


@settings(max_examples=300, deadline=None)
@given(
    props=st.dictionaries(
        st.text(), st.none() | st.booleans() | st.integers() | st.floats() | st.text(), max_size=8
    )
)
def test_both_encoders_write_the_same_json(props: dict[str, Any]) -> None:
    # Same value, and the same refusals; float spelling may differ (1e-09 vs 1e-9).
    try:
        expected = event_module._stdlib_encode(props)
    except (ValueError, TypeError, OverflowError):
        expected = None
    try:
        got = event_module._orjson_encode(props)
    except (ValueError, TypeError, OverflowError):
        got = None
    assert (got is None) == (expected is None)
    if got is not None and expected is not None:
        assert json.loads(got) == json.loads(expected)
        if not any(isinstance(v, float) for v in props.values()):
            assert got == expected


def test_a_timestamp_that_looks_like_seconds_is_accepted_and_said_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_module, "_warned_small", [])
    caplog.set_level(logging.WARNING, logger="samsara_mp")
    encoder = event_module.EventEncoder("s", 65536)
    for ts in (1_700_000_000, 1_700_000_001):  # seconds, by mistake
        assert json.loads(encoder.encode_owned({"eventName": "e", "timestamp": ts}))["timestamp"] == ts
    encoder.encode_owned({"eventName": "e", "timestamp": 1_700_000_000_000})  # milliseconds
    warnings = [r for r in caplog.records if "seconds, by mistake" in r.getMessage()]
    assert len(warnings) == 1 and "1700000000" in warnings[0].getMessage()
    monkeypatch.setattr(event_module, "_warned_small", [])
    quiet = event_module.EventEncoder("s", 65536, warn_small_timestamps=False)
    quiet.encode_owned({"eventName": "e", "timestamp": 5})
    assert len([r for r in caplog.records if "seconds, by mistake" in r.getMessage()]) == 1
