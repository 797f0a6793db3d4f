"""The pytest plugin (entry point ``pytest11``): the ``samsara_events`` fixture.

Loaded by pytest in every project where samsara-mp is installed, so it
imports nothing of samsara_mp until a test asks for the fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def samsara_events() -> Iterator[list[dict[str, Any]]]:
    """Every event recorded in this process during the test, as dicts (``capture_events()``)."""
    from .testing import capture_events

    with capture_events() as events:
        yield events
