"""User callbacks that run in the publisher: ``on_success`` and ``on_failure``.

They cross a process boundary, so they are configured as importable paths
(``"package.module:function"``) and resolved in the publisher. A hook that
raises is logged and otherwise ignored: it must not stop publishing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._env import resolve_callable

if TYPE_CHECKING:
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

    # A hook failing on every batch logs its traceback once, then a count at most this often.
    LOG_EVERY_S = 60.0

    def __init__(self, on_success: str | None, on_failure: str | None) -> None:
        self.on_success = resolve_hook("on_success", on_success)
        self.on_failure = resolve_hook("on_failure", on_failure)
        self.errors = 0
        self._logged_at = -self.LOG_EVERY_S
        self._unlogged = 0

    def __call__(self, outcome: Outcome) -> None:
        if outcome.delivered and self.on_success is not None:
            self._call(self.on_success, len(outcome.delivered), outcome.last_answer)
        failed = len(outcome.rejected) or (outcome.pending if outcome.retry else 0)
        if failed and self.on_failure is not None:
            self._call(self.on_failure, failed, outcome.error)

    def _call(self, hook: Callable[..., Any], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - a user hook must not stop publishing
            self.errors += 1
            now = time.monotonic()
            if now - self._logged_at >= self.LOG_EVERY_S:
                more = f" ({self._unlogged} more hook errors since the last report)" if self._unlogged else ""
                log.exception("samsara_mp: hook %s raised%s; publishing goes on",
                              getattr(hook, "__qualname__", repr(hook)), more)
                self._logged_at = now
                self._unlogged = 0
            else:
                self._unlogged += 1
