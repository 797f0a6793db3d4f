"""How the reference server judges an event POST's body, as the real API does.

The publisher's batch arrives at ``POST {url}/v1/events``; before anything is
stored, the body is parsed strictly and every event checked. A bad batch is
refused whole with a positional answer (the Ingestion API's documented answers): one entry per
event, ``"OK"`` or what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

MISSING_HEADER_WARNING: Final = (
    "For completeness, please provide the 'X-Samsara-publishedTimestamp' header."
)
NOT_A_LIST_ERROR: Final = "Invalid format, content-type must be application/json"


def _reject_constant(name: str) -> Any:
    # The real API parses with Jackson, which refuses NaN/Infinity literals.
    raise ValueError(f"invalid JSON literal {name}")


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def _stdlib_decode(body: bytes) -> Any:
    return _DECODER.decode(body.decode("utf-8"))


try:  # orjson (the "fast" and "test" extras) parses about twice as fast.
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    orjson = None  # type: ignore[assignment]

# Digits to "0", everything else to " ": a run of 19 zeros in the translation
# is a number orjson may not parse as Python does (it turns integers outside
# [-2**63, 2**64) into floats), or a long digit string, which is merely slower.
_DIGIT_TABLE: Final = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGITS: Final = b"0" * 19


def decode_body(body: bytes) -> Any:
    """Parse a request body as the stdlib decoder would, faster when orjson is installed.

    orjson's answer is used only when it parsed the body and no number in it
    could be out of its exact range; any other body is decided by the stdlib
    decoder, so what is accepted and what is stored do not depend on the extra.
    Raises ``ValueError`` (or ``RecursionError``) for a body that is not JSON.
    Known difference: on Python 3.11 orjson parses nesting up to ~1,023
    levels, deeper than the stdlib's recursion limit allows, so a body nested
    1,000+ levels deep is accepted here where the stdlib would refuse it.
    """
    if orjson is not None and _LONG_DIGITS not in body.translate(_DIGIT_TABLE):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return _stdlib_decode(body)


def _event_error(event: object) -> str | None:
    if type(event) is not dict:
        return "event: must be a JSON object"
    errors: list[str] = []
    if "timestamp" not in event:
        errors.append("timestamp: missing")
    else:
        ts = event["timestamp"]
        if type(ts) is not int:
            errors.append("timestamp: must be an integer (epoch millis)")
        elif ts < 0:
            errors.append("timestamp: must be >= 0")
    for key in ("eventName", "sourceId"):
        if key not in event:
            errors.append(f"{key}: missing")
        elif type(event[key]) is not str or not event[key]:
            errors.append(f"{key}: must be a non-empty string")
    return "; ".join(errors) if errors else None


def validate_events(events: Sequence[object]) -> list[str] | None:
    """Return None when every event is valid, else the positional 400 answer.

    The answer has one entry per event: ``"OK"`` or a description such as
    ``"timestamp: missing"``. ``bool`` is not an integer timestamp.
    """
    # One cheap pass for the common all-valid batch; describe errors only on failure.
    for ev in events:
        if type(ev) is dict:
            ts = ev.get("timestamp")
            name = ev.get("eventName")
            src = ev.get("sourceId")
            if (
                type(ts) is int
                and ts >= 0
                and type(name) is str
                and name
                and type(src) is str
                and src
            ):
                continue
        break
    else:
        return None
    return [_event_error(ev) or "OK" for ev in events]
