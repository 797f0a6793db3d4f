"""Validate, enrich and encode one event, in the worker, at record time.

This is the hot path of ``record_event``: a few type checks and one call into
the C JSON encoder. The slow work of explaining a failure happens only after
the fast path has failed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import InvalidEvent
from .helpers import current_time_millis

__all__ = ["EventEncoder", "MANDATORY_FIELDS"]

MANDATORY_FIELDS = ("timestamp", "eventName", "sourceId")
# The last millisecond of the year 9999: well inside the API's 64-bit long, and any
# later value is a unit mistake (micro- or nanoseconds), not a date.
MAX_TIMESTAMP = 253_402_300_799_999
# Under this, epoch milliseconds fall before 2001-09-09: far more often a timestamp in seconds.
SMALL_TIMESTAMP = 10**12
_warned_small: list[int] = []  # said once per process
log = logging.getLogger("samsara_mp")

# The checking encoder: used to explain a failure, and where the C one is missing.
_json_encode = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":")
).encode
_ENCODE_ERRORS = (TypeError, ValueError, RecursionError, OverflowError)


def _refuse_type(obj: object) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _make_fast_json() -> Callable[[Any], bytes]:
    """The C encoder built once (``JSONEncoder.encode`` rebuilds it on every call).

    Without circular-reference markers a cycle ends in RecursionError, which is
    refused and then explained by the checking encoder.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return lambda event: _json_encode(event).encode("utf-8")
    c_encode = make(None, _refuse_type, json.encoder.encode_basestring, None, ":", ",",
                    False, False, False)
    return lambda event: "".join(c_encode(event, 0)).encode("utf-8")


_stdlib_fast = _make_fast_json()
_CONTAINERS = (dict, list, tuple)


class DuplicateKey(ValueError):
    """Two keys of one nested mapping become the same JSON property name."""


def _check_keys(value: Any) -> None:
    """Refuse a nested mapping whose keys collide once JSON makes them strings
    (``{1: "a", "1": "b"}``): the API would see a duplicate property name."""
    if isinstance(value, dict):
        for k in value:  # a loop: all(<generator>) made a generator per dict
            if type(k) is not str:
                _refuse_duplicate_keys(value)
                break
        for v in value.values():
            if isinstance(v, _CONTAINERS):
                _check_keys(v)
    else:
        for v in value:
            if isinstance(v, _CONTAINERS):
                _check_keys(v)


def _refuse_duplicate_keys(value: dict[Any, Any]) -> None:
    seen: set[str] = set()
    for k in value:
        name = k if isinstance(k, str) else _json_encode({k: 0})[2:-4]
        if name in seen:
            raise DuplicateKey(f"keys {k!r} and {name!r} are the same JSON property name")
        seen.add(name)


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _stdlib_encode(event: dict[str, Any]) -> bytes:
    # One C-level pass over the values' exact types skips the walk for an event of
    # plain values (0.23-0.29 us of 2.2 on the benchmarks' flat event).
    if not _PLAIN.issuperset(map(type, event.values())):
        for value in event.values():
            if isinstance(value, _CONTAINERS):
                _check_keys(value)
    return _stdlib_fast(event)

try:  # The optional "fast" extra.
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    orjson = None  # type: ignore[assignment]

_SIMPLE_TYPES = frozenset({str, int, bool, type(None)})


def _orjson_encode(event: dict[str, Any]) -> bytes:
    """orjson for flat events of plain values, where its output equals the stdlib's.

    orjson writes NaN as null and turns datetimes, UUIDs and enums into
    strings; those (and any nesting) take the stdlib path, so what is refused
    or converted does not depend on whether orjson is installed.
    """
    for value in event.values():
        kind = type(value)
        if kind not in _SIMPLE_TYPES and not (kind is float and math.isfinite(value)):
            return _stdlib_encode(event)
    try:
        data = orjson.dumps(event)
    except TypeError:  # big ints, lone surrogates, non-str keys: let the stdlib decide
        return _stdlib_encode(event)
    # orjson shrinks an oversized buffer into the bytes it returns; kept alive
    # (staged until shipped), those leave the heap fragmented and each later
    # dumps() slower: 3.1 us per event instead of 1.2 when a worker keeps 1,000
    # of them (benchmarks/README.md, "Hot spots"). A copy of 0.1 us is a fresh,
    # right-sized object, and orjson's buffer is freed at once and reused.
    return memoryview(data).tobytes()


encode_json: Callable[[Any], bytes] = _stdlib_encode if orjson is None else _orjson_encode
ENCODER_NAME = "json" if orjson is None else "orjson"


class EventEncoder:
    """Turns an event mapping into compact JSON bytes, or raises ``InvalidEvent``."""

    __slots__ = ("_source_id", "_max_bytes", "_now", "_warn_small")

    def __init__(
        self,
        source_id: str | None,
        max_event_bytes: int,
        now: Callable[[], int] = current_time_millis,
        warn_small_timestamps: bool = True,
    ) -> None:
        self._source_id = source_id
        self._max_bytes = max_event_bytes
        self._now = now
        self._warn_small = warn_small_timestamps

    def encode_owned(self, event: dict[str, Any]) -> bytes:
        """Encode a dict the caller gave up (``**kwargs``); it may be enriched in place.

        The hot path: :meth:`enrich` and :meth:`encode_enriched` inlined into one
        call (calling the two costs ~0.2 us of ~1.8); tests/test_event.py checks that
        the three agree on every valid and invalid event it knows."""
        ts = event.get("timestamp")
        if ts is None:
            event["timestamp"] = self._now()
        elif type(ts) is not int or ts < SMALL_TIMESTAMP or ts > MAX_TIMESTAMP:
            self._odd_timestamp(ts)
        name = event.get("eventName")
        if type(name) is not str or not name:
            _refuse_string("eventName", name, event)
        sid = event.get("sourceId")
        if sid is None:
            sid = self._source_id
            if sid is None:
                raise InvalidEvent("sourceId", "missing, and no sourceId is configured")
            event["sourceId"] = sid
        elif type(sid) is not str or not sid:
            _refuse_string("sourceId", sid, event)
        try:
            data = encode_json(event)
        except _ENCODE_ERRORS as exc:
            raise _explain(event, exc) from None
        if len(data) > self._max_bytes:
            raise InvalidEvent("event", _oversize(event, len(data), self._max_bytes))
        return data

    def _odd_timestamp(self, ts: object) -> None:
        """Off the hot path: refuse a timestamp that is not epoch milliseconds, and say once
        per process when one looks like seconds (it is accepted: the API allows it)."""
        if type(ts) is int and 0 <= ts < SMALL_TIMESTAMP:
            if self._warn_small and not _warned_small:
                _warned_small.append(ts)
                log.warning("samsara_mp: an event's timestamp %d is before 2001-09-09 in epoch "
                            "milliseconds: seconds, by mistake? (accepted; set "
                            "warn_small_timestamps=False to silence this)", ts)
            return
        _refuse_timestamp(ts)

    def enrich(self, event: dict[str, Any]) -> None:
        """Check the mandatory fields and fill in a missing ``timestamp`` and ``sourceId``."""
        ts = event.get("timestamp")
        if ts is None:
            event["timestamp"] = self._now()
        elif type(ts) is not int or ts < SMALL_TIMESTAMP or ts > MAX_TIMESTAMP:
            self._odd_timestamp(ts)
        name = event.get("eventName")
        if type(name) is not str or not name:
            _refuse_string("eventName", name, event)
        sid = event.get("sourceId")
        if sid is None:
            sid = self._source_id
            if sid is None:
                raise InvalidEvent("sourceId", "missing, and no sourceId is configured")
            event["sourceId"] = sid
        elif type(sid) is not str or not sid:
            _refuse_string("sourceId", sid, event)

    def encode_enriched(self, event: dict[str, Any]) -> bytes:
        """Encode an event :meth:`enrich` has checked: JSON, within ``max_event_bytes``."""
        try:
            data = encode_json(event)
        except _ENCODE_ERRORS as exc:
            raise _explain(event, exc) from None
        if len(data) > self._max_bytes:
            raise InvalidEvent("event", _oversize(event, len(data), self._max_bytes))
        return data

    def encode(self, event: Mapping[str, Any]) -> bytes:
        """Encode a caller's mapping without touching it."""
        if not isinstance(event, Mapping):
            raise InvalidEvent("event", f"must be a mapping, not {type(event).__name__}")
        return self.encode_owned(dict(event))

    def encode_many(self, events: Iterable[Mapping[str, Any]]) -> list[bytes]:
        """Encode a batch; the first invalid event raises, naming its index."""
        if events is None or isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Iterable):
            raise InvalidEvent(
                "events", f"must be an iterable of event mappings, not {type(events).__name__}"
            )
        out = []
        for index, event in enumerate(events):
            try:
                out.append(self.encode(event))
            except InvalidEvent as exc:
                raise InvalidEvent(f"events[{index}].{exc.field}", exc.reason) from None
        return out


def _refuse_timestamp(ts: object) -> None:
    if type(ts) is not int:
        raise InvalidEvent(
            "timestamp", f"must be an integer of epoch milliseconds, not {type(ts).__name__}"
        )
    if ts > MAX_TIMESTAMP:
        shown = str(ts) if ts < 10**30 else f"a {len(str(ts))}-digit number"
        raise InvalidEvent("timestamp", f"{shown} is after the year 9999 (max {MAX_TIMESTAMP} ms)")
    raise InvalidEvent("timestamp", f"must be >= 0, not {ts}")


def _oversize(event: Mapping[str, Any], size: int, limit: int) -> str:
    """Say how big the event is, and which field makes most of it."""
    largest, largest_size = None, 0
    for key, value in event.items():
        try:
            n = len(encode_json({key: value}))
        except _ENCODE_ERRORS:
            continue
        if n > largest_size:
            largest, largest_size = key, n
    hint = f"; largest field {largest!r}: {largest_size} bytes" if largest is not None else ""
    return f"whole event: {size} bytes > max_event_bytes {limit}{hint}"


def _refuse_string(field: str, value: object, event: Mapping[str, Any]) -> None:
    if value is None:
        raise InvalidEvent(field, "missing")
    if type(value) is not str:
        raise InvalidEvent(field, f"must be a string, not {type(value).__name__}")
    raise InvalidEvent(field, "must not be empty")


def _explain(event: Mapping[str, Any], exc: BaseException) -> InvalidEvent:
    """Find which field broke encoding and say why, after the fast path failed."""
    for key, value in event.items():
        if not isinstance(key, str):
            return InvalidEvent(repr(key)[:80], "property names must be strings")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            return InvalidEvent(ascii(key)[:80], "property name is not valid Unicode (lone surrogate)")
        try:
            _json_encode(value).encode("utf-8")  # first: it tells a cycle from deep nesting
            if isinstance(value, _CONTAINERS):
                _check_keys(value)
        except RecursionError:
            return InvalidEvent(key, "nested too deeply to encode as JSON")
        except _ENCODE_ERRORS as inner:
            return InvalidEvent(key, _reason(value, inner))
    return InvalidEvent("event", f"not JSON-serialisable: {type(exc).__name__}")


def _reason(value: object, exc: BaseException) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not allowed in JSON"
    if isinstance(exc, UnicodeError):
        return "string is not valid Unicode (lone surrogate)"
    if isinstance(exc, DuplicateKey):
        return str(exc)
    if isinstance(exc, ValueError) and "Circular" in str(exc):
        return "contains a circular reference"
    if isinstance(exc, ValueError) and "compliant" in str(exc):
        return "contains NaN or Infinity, which JSON does not allow"
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"not JSON-serialisable ({text})"
