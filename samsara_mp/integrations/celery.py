"""Celery: the worker's main process owns the publisher; prefork pool children record.

In the data flow of docs/design.md a Celery worker is an explicit owner: its main process
starts the channel's publisher before the pool forks and stops it, with a
drain, after the pool has been joined. Each pool child records through
:func:`samsara_mp.get_client`. Call :func:`setup` once, in the module that
creates the Celery app, so that every process of the worker has connected the
signals before billiard forks::

    app = Celery("proj", broker=...)
    samsara_mp.integrations.celery.setup(app, url="https://ingest.example")

Why each hook exists. billiard's pool child runs ``Worker.__call__``, whose
``_do_exit`` calls the pool's ``on_exit`` (Celery's ``process_destructor``,
which sends ``worker_process_shutdown``), posts its death notice and then
calls ``os._exit``, from inside ``Process.run``. So a child that is recycled
(``--max-tasks-per-child``, ``--max-memory-per-child``), stopped by a warm
shutdown or SIGTERMed (billiard turns SIGTERM into ``SystemExit``, which
reaches the same ``_do_exit``) never reaches ``Process._bootstrap``'s
``util._exit_function()`` nor the interpreter's ``atexit``: the client's own
exit hooks do not run there, and ``worker_process_shutdown`` is the last
chance to ship. A SIGKILL (hard time limit, OOM killer, Celery's
``PR_SET_PDEATHSIG`` when the main process dies) leaves no chance at all, so
the events of a finished task are also shipped on ``task_postrun``.

That postrun ship costs one IPC round trip to the publisher when the task
recorded anything, and about a microsecond otherwise. Measured on a 2-core
machine (``ship_all`` after recording k events, 2000 times each): median
0.08 ms for k=1, 0.14 ms for k=10, 0.19 ms for k=100; p99 0.3, 0.8 and 4 ms.
When the publisher cannot be reached, a task waits at most ``ship_timeout``
and the following ones skip the postrun ship for ``_POSTRUN_BACKOFF``
seconds, leaving their events to the shipper thread.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from celery import signals  # type: ignore[import-untyped]

from .. import (
    ChannelError,
    ChannelTaken,
    Config,
    InvalidConfiguration,
    Publisher,
    close_all,
    get_client,
    process,
    ship_all,
)
from ..config import check_keys

__all__ = ["setup", "teardown"]

log = logging.getLogger("samsara_mp")

_UID = "samsara_mp.integrations.celery."
_POSTRUN_BACKOFF = 5.0


@dataclass(frozen=True)
class _Settings:
    app: Any
    config: dict[str, Any]
    own_publisher: bool
    ship_after_task: bool
    ship_timeout: float
    close_timeout: float | None


_settings: _Settings | None = None
_publisher: Publisher | None = None
_owner_pid: int | None = None
_postrun_skip_until = 0.0


def setup(
    app: Any = None,
    *,
    own_publisher: bool = True,
    ship_after_task: bool = True,
    ship_timeout: float = 0.5,
    close_timeout: float | None = None,
    **config: Any,
) -> None:
    """Connect samsara_mp to the Celery worker's signals; calling it again replaces the settings.

    ``config`` holds client settings (keyword > ``SAMSARA_MP_*`` environment >
    defaults) used both for the publisher the main process owns and for each
    pool child's :func:`~samsara_mp.get_client`. With an ``app``, only that
    app's workers and tasks are handled. Unknown keys raise
    ``InvalidConfiguration`` here; the rest is validated when the worker
    starts, so a process that only sends tasks needs no samsara settings.

    - ``own_publisher``: the main process starts the publisher at
      ``worker_init`` and stops it, draining, at ``worker_shutdown``. Without
      it, children use a publisher someone else owns or elect one.
    - ``ship_after_task``: push the task's staged events to the publisher on
      ``task_postrun``, waiting at most ``ship_timeout`` seconds (paused for a
      few seconds after a failure, so a lost publisher does not slow every task).
    - ``close_timeout``: how long a child may spend shipping on
      ``worker_process_shutdown`` (and the main process on ``worker_shutdown``);
      by default the configuration's ``exit_timeout``.
    """
    check_keys(config)
    for name, value in (("ship_timeout", ship_timeout), ("close_timeout", close_timeout)):
        if name == "close_timeout" and value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise InvalidConfiguration(name, f"must be a number of seconds >= 0, not {value!r}")
    global _settings
    _settings = _Settings(
        app=app,
        config=dict(config),
        own_publisher=own_publisher,
        ship_after_task=ship_after_task,
        ship_timeout=float(ship_timeout),
        close_timeout=None if close_timeout is None else float(close_timeout),
    )
    for signal, handler in _HANDLERS:
        signal.connect(handler, dispatch_uid=_UID + handler.__name__)
    if own_publisher:
        # worker_init starts the publisher here: clients made before it leave the start to it.
        process.expect_owner()


def teardown() -> None:
    """Disconnect the signals; stop the publisher this process owns, if any."""
    global _settings, _publisher
    for signal, handler in _HANDLERS:
        signal.disconnect(handler, dispatch_uid=_UID + handler.__name__)
    _settings = None
    pub, _publisher = _publisher, None
    if pub is not None and _owner_pid == os.getpid():
        pub.stop()


def _close_timeout(settings: _Settings) -> float:
    if settings.close_timeout is not None:
        return settings.close_timeout
    try:
        return Config.build(**settings.config).exit_timeout_s
    except InvalidConfiguration:
        return Config.exit_timeout / 1000.0


def _ours(sender: Any, settings: _Settings) -> bool:
    if settings.app is None:
        return True
    app = getattr(sender, "app", None)
    return app is None or app is settings.app


# ---- main process ----
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _publisher, _owner_pid
    s = _settings
    if s is None or not s.own_publisher or not _ours(sender, s):
        return
    if _publisher is not None and _owner_pid == os.getpid():
        return
    pub = Publisher(**s.config)
    try:
        pub.start()
    except ChannelTaken as exc:
        # Another worker on this host owns the channel already: its children
        # and ours then share that publisher, which is the point of a channel.
        log.info("samsara_mp: %s; this Celery worker uses it", exc)
        return
    except (ChannelError, OSError) as exc:
        log.warning("samsara_mp: this Celery worker could not start the publisher (%s)", exc)
        return
    _publisher, _owner_pid = pub, os.getpid()


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    global _publisher
    s = _settings
    if s is None or not _ours(sender, s):
        return
    # Solo and thread pools record in this process; ship before the drain.
    close_all(_close_timeout(s))
    pub = _publisher
    if pub is None or _owner_pid != os.getpid():
        return
    _publisher = None
    code = pub.stop()
    if code:
        log.warning("samsara_mp: publisher exited with status %s", code)


# ---- pool children ----
def _on_worker_process_init(**_: Any) -> None:
    s = _settings
    if s is not None:
        # Only builds the client and starts its shipper thread: no waiting here,
        # where Celery kills a child that takes more than 4 s to start.
        get_client(**s.config)


def _on_task_postrun(sender: Any = None, **_: Any) -> None:
    global _postrun_skip_until
    s = _settings
    if s is None or not s.ship_after_task or not _ours(sender, s):
        return
    if time.monotonic() < _postrun_skip_until:
        return
    if not ship_all(s.ship_timeout):
        # Unreachable: do not make every task wait for it; the shipper keeps trying.
        _postrun_skip_until = time.monotonic() + _POSTRUN_BACKOFF
        log.info("samsara_mp: publisher unreachable after a task; postrun ship paused")


def _on_worker_process_shutdown(**_: Any) -> None:
    s = _settings
    if s is not None and not close_all(_close_timeout(s)):
        log.warning("samsara_mp: pool process %d exits with unshipped events", os.getpid())


_HANDLERS = (
    (signals.worker_init, _on_worker_init),
    (signals.worker_shutdown, _on_worker_shutdown),
    (signals.worker_process_init, _on_worker_process_init),
    (signals.task_postrun, _on_task_postrun),
    (signals.worker_process_shutdown, _on_worker_process_shutdown),
)
