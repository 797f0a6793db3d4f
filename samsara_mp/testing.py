"""A test mode for applications' own tests: capture events instead of sending them.

``capture_events()`` makes every ``SamsaraClient`` of this process (made
before the block or inside it, ``get_client()``'s included) hand each event it
records to a list, validated and passed through ``before_send`` and sampling
exactly as it would be sent, and stage nothing: no publisher is launched, no
thread started, no socket opened, nothing sent. The pytest plugin
(``samsara_mp.pytest_plugin``) wraps it as the ``samsara_events`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import process

__all__ = ["capture_events"]


@contextmanager
def capture_events() -> Iterator[list[dict[str, Any]]]:
    """Yield a list that receives, as dicts, every event recorded in this process while active.

    ``publish_events`` is captured too (and returns True). A client made
    inside the block with no url configured anywhere never sends: after the
    block it validates and discards, as with ``disabled=True``. Blocks may
    nest; each active list receives every event.
    """
    events: list[dict[str, Any]] = []
    process.start_capture(events)
    try:
        yield events
    finally:
        process.stop_capture(events)
