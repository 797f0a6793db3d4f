"""The clients of this process: fork and exit hooks, and process-wide helpers.

Every open ``SamsaraClient`` is registered here, strongly: a client dropped
without ``close()`` must still ship its staged events when the process ends.
After ``fork()`` each client gets fresh per-process state; at exit (atexit, and
``multiprocessing``'s finalizers in its children) each ships what it staged,
and asks the publisher to send what it pushed now, bounded by its ``exit_timeout``.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from multiprocessing import util as mp_util
from typing import Any, Protocol

__all__ = [
    "ship_all", "close_all", "reset_after_fork", "register", "unregister", "Shippable",
    "expect_owner", "owner_expected", "capturing", "capture_sinks", "start_capture", "stop_capture",
]

log = logging.getLogger("samsara_mp")


class Shippable(Protocol):
    """What the process hooks need of a client (``SamsaraClient`` is one)."""

    closed: bool
    pid: int
    exit_timeout_s: float

    def ship(self, timeout: float | None = None) -> bool: ...
    def close(self, timeout: float | None = None, *, send_now: bool = False) -> bool: ...
    def after_fork_in_child(self) -> None: ...
    def refresh_mode(self) -> None: ...


_CLIENTS: set[Shippable] = set()


def register(client: Shippable) -> None:
    _CLIENTS.add(client)


def unregister(client: Shippable) -> None:
    _CLIENTS.discard(client)


def reset_after_fork() -> None:
    """Give every client of this process fresh per-process state, if it was forked.

    Runs by itself after ``os.fork()``; servers that fork from C without
    Python's fork hooks (uWSGI) call it from their post-fork hook. Idempotent.
    """
    for client in list(_CLIENTS):
        client.after_fork_in_child()


os.register_at_fork(after_in_child=reset_after_fork)


def _open_clients() -> list[Shippable]:
    """Clients this process may ship for: open, and not inherited through a fork."""
    pid = os.getpid()
    return [c for c in list(_CLIENTS) if not c.closed and c.pid == pid]


def ship_all(timeout: float = 5.0) -> bool:
    """Push every client's staged events to the publisher, within ``timeout`` in all."""
    deadline = time.monotonic() + timeout
    done = True
    for client in _open_clients():
        done = client.ship(max(deadline - time.monotonic(), 0.0)) and done
    return done


def close_all(timeout: float = 5.0) -> bool:
    """Ship and close every client of this process, within ``timeout`` in all."""
    deadline = time.monotonic() + timeout
    done = True
    for client in _open_clients():
        done = client.close(max(deadline - time.monotonic(), 0.0)) and done
    return done


def guard_pool_worker(timeout: float) -> None:
    """In a ``multiprocessing.Pool`` worker whose SIGTERM is still the default, ship
    staged events on SIGTERM (within ``timeout``) before it ends the worker.

    ``with Pool() as p:`` leaves through ``Pool.terminate()``, which SIGTERMs the
    workers; the default action skips every exit hook, so what a worker had
    staged (all of it, on a cold channel whose publisher is still starting) was
    lost, and counted nowhere. ``PoolPublisher``'s initializer installs the same
    handler; this covers a plain Pool. A handler of the application's own, and
    any thread but the main one, are left alone."""
    if _pool_guarded[0] == os.getpid():
        return
    import multiprocessing
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or multiprocessing.parent_process() is None
            or "PoolWorker" not in multiprocessing.current_process().name
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return
    _pool_guarded[0] = os.getpid()
    from .integrations.multiprocessing import _install

    try:
        # Nothing in a Pool worker reads a wakeup fd a fork inherited: the watcher takes it.
        _install(timeout, take_wakeup_fd=True)
    except (OSError, ValueError) as exc:
        log.warning("samsara_mp: cannot ship on SIGTERM in this Pool worker: %s", exc)


_pool_guarded = [0]  # the pid whose Pool-worker SIGTERM guard was decided


def _close_all_at_exit() -> None:
    """Ship every open client's staged events as the process ends, each bounded.

    A process's exit is the end of its work (the last worker of an executor
    that shut down): a client that pushed events no flush has answered for
    also asks the publisher to send them now, without waiting for the delivery,
    so they do not wait out ``publish_interval`` there. A client that pushed
    nothing makes no connection."""
    for client in _open_clients():
        try:
            client.close(client.exit_timeout_s, send_now=True)
        except Exception:  # noqa: BLE001 - never let an exit hook raise
            log.exception("samsara_mp: flush at exit failed")


class _Anchor:
    """A weak-referenceable object for multiprocessing's after-fork registry."""


_anchor = _Anchor()


def _register_exit_finalizer(_: object = None) -> None:
    # multiprocessing children leave through util._exit_function, not atexit.
    # A Process child clears the finalizer registry after the fork (and after
    # unpickling under spawn), then runs the after-fork registry: re-register there.
    mp_util.Finalize(None, _close_all_at_exit, exitpriority=100)


atexit.register(_close_all_at_exit)
_register_exit_finalizer()
mp_util.register_after_fork(_anchor, _register_exit_finalizer)


_owner_pid: int | None = None


def expect_owner() -> None:
    """Say that this process will own the channel's publisher (a gunicorn master's
    hooks, a Celery main process): its clients then do not launch one themselves
    when they are made, and leave the start to the owner."""
    global _owner_pid
    _owner_pid = os.getpid()


def owner_expected() -> bool:
    """True in a process that said :func:`expect_owner` (not in its forked children)."""
    return _owner_pid == os.getpid()


# The lists of active ``testing.capture_events()`` blocks: while any is, every
# client of this process hands its events to them instead of staging them.
_captures: list[list[dict[str, Any]]] = []


def capturing() -> bool:
    return bool(_captures)


def capture_sinks() -> list[list[dict[str, Any]]]:
    return _captures


def start_capture(sink: list[dict[str, Any]]) -> None:
    """Send every event any client of this process records to ``sink`` (see ``testing``)."""
    _captures.append(sink)
    _refresh_clients()


def stop_capture(sink: list[dict[str, Any]]) -> None:
    for i, active in enumerate(_captures):
        if active is sink:
            del _captures[i]
            break
    _refresh_clients()


def _refresh_clients() -> None:
    for client in list(_CLIENTS):
        client.refresh_mode()
