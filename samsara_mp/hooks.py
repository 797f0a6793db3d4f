"""User callbacks that run in the publisher: ``on_success`` and ``on_failure``.

They cross a process boundary, so they are configured as importable paths
(``"package.module:function"``) and resolved in the publisher. A hook that
raises is logged and otherwise ignored: it must not stop publishing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .config import resolve_callable
from .delivery import Outcome

__all__ = ["resolve_hook", "OutcomeHooks"]

log = logging.getLogger("samsara_mp")


def resolve_hook(key: str, path: str | None) -> Callable[..., Any] | None:
    """Import ``module:function`` (or ``module.function``); ``InvalidConfiguration`` if absent."""
    if not path:
        return None
    return resolve_callable(key, path)


class OutcomeHooks:
    """Calls ``on_success(events_count, response)`` / ``on_failure(events_count, error)``."""

    def __init__(self, on_success: str | None, on_failure: str | None) -> None:
        self.on_success = resolve_hook("on_success", on_success)
        self.on_failure = resolve_hook("on_failure", on_failure)

    def __call__(self, outcome: Outcome) -> None:
        if outcome.delivered and self.on_success is not None:
            self._call(self.on_success, len(outcome.delivered), outcome.last_answer)
        failed = len(outcome.rejected) or (outcome.pending if outcome.retry else 0)
        if failed and self.on_failure is not None:
            self._call(self.on_failure, failed, outcome.error)

    @staticmethod
    def _call(hook: Callable[..., Any], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - a user hook must not stop publishing
            log.exception("samsara_mp: hook %r raised", hook)
