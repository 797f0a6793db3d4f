"""Supervision of the publisher's long-lived threads: none of them dies silently.

A thread's body that raises unexpectedly is logged with its traceback,
counted (``loop_errors`` in the stats) and run again after a backoff. When it
keeps failing (``GIVE_UP_AFTER`` failures in a row, each within
``QUICK_FAILURE_S`` of its start) the supervisor gives up on it and says so
(``failed``); the publisher then exits non-zero, spooling what it holds, so
that the next client elects a fresh one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .retry import RetryPolicy

__all__ = ["Supervisor", "GIVE_UP_AFTER"]

log = logging.getLogger("samsara_mp")

GIVE_UP_AFTER = 10
QUICK_FAILURE_S = 30.0


class Supervisor:
    """Runs thread bodies under supervision; ``errors`` counts every unexpected exception."""

    def __init__(self, stop: threading.Event, policy: RetryPolicy,
                 give_up_after: int | None = GIVE_UP_AFTER) -> None:
        self.stop = stop
        self.policy = policy
        self.give_up_after = give_up_after  # None: never (a worker's shipper thread)
        self.errors = 0
        self.failed: str | None = None  # the body given up on, if any
        self._lock = threading.Lock()

    def thread(self, name: str, body: Callable[[], None], on_error: Callable[[], None] | None = None
               ) -> threading.Thread:
        """A started daemon thread running ``body`` under supervision; ``on_error`` (if
        given) resets the body's state before it runs again."""
        t = threading.Thread(target=self.run, args=(name, body, on_error), name=name, daemon=True)
        t.start()
        return t

    def run(self, name: str, body: Callable[[], None], on_error: Callable[[], None] | None = None
            ) -> None:
        """Run ``body`` until it returns or the stop event is set, restarting it on errors."""
        in_a_row = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                body()
                return
            except Exception:  # noqa: BLE001 - logged with its traceback and counted
                with self._lock:
                    self.errors += 1
                in_a_row = in_a_row + 1 if time.monotonic() - started < QUICK_FAILURE_S else 1
                log.exception("samsara_mp: %s failed (error %d in a row); restarting it", name, in_a_row)
            if on_error is not None:
                try:
                    on_error()
                except Exception:  # noqa: BLE001
                    log.exception("samsara_mp: resetting %s failed", name)
            if self.give_up_after is not None and in_a_row >= self.give_up_after:
                self.failed = name
                log.error("samsara_mp: %s failed %d times in a row; giving up on it", name, in_a_row)
                return
            self.stop.wait(self.policy.ceiling(in_a_row))

    def guard(self, name: str, step: Callable[[], None]) -> None:
        """Run one step of a loop that cannot be restarted (the main thread's): log and
        count an unexpected error, and go on."""
        try:
            step()
        except Exception:  # noqa: BLE001
            with self._lock:
                self.errors += 1
            log.exception("samsara_mp: %s failed; carrying on", name)
