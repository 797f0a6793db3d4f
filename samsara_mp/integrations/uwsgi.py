"""uWSGI integration: fork reset and exit shipping for workers that uWSGI forks from C.

uWSGI forks its workers in C and, unless started with ``py-call-osafterfork``
(or ``py-call-uwsgi-fork-hooks``), does not run Python's at-fork hooks in
them (checked with uWSGI 2.0.31: an ``os.register_at_fork`` hook runs in the
workers only with ``py-call-osafterfork``). A client created while the app
loads in the master would then keep the master's staging, locks and shipper
in every worker. Importing this module under uWSGI registers:

- a post-fork hook (``uwsgidecorators.postfork``) calling ``reset_after_fork()``;
- ``uwsgi.atexit`` calling ``close_all()`` within the ``exit_timeout`` setting,
  chained with any ``uwsgi.atexit`` already set. uWSGI calls it only in a
  worker that is idle when it dies: a brutal stop (SIGINT, SIGQUIT) of a
  worker still in a request, or in the after-request work that follows its
  answer, skips it, and its staged events are lost. A graceful shutdown (the
  master FIFO's ``q``) and a reload (SIGHUP) let the request finish first;
- ``uwsgi.after_req_hook`` which, after :func:`install` with
  ``ship_after_request=True``, ships each request's events before the worker
  takes the next one.

Who owns the publisher: the first worker that ships elects it (clients keep
``start_publishing_thread=True``). It is a process of its own, so it outlives
worker recycling and reloads, and it exits after ``idle_timeout`` with no
clients. To give it an owner instead, run ``samsara-mp publisher`` as an
``attach-daemon2`` of the master. uWSGI sets ``sys.executable`` to its own
binary: give ``py-executable`` so that a worker can start the publisher.
Load this module with ``import = samsara_mp.integrations.uwsgi`` in
uwsgi.ini, or import it from the WSGI module, before any worker is forked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..client import close_all, reset_after_fork, ship_all
from ..config import Config
from ..errors import InvalidConfiguration

__all__ = ["install", "installed"]

log = logging.getLogger("samsara_mp")

# The after-request shipping gives up retrying after this long; one attempt
# is bounded by ipc_timeout, and what is left stays staged.
_REQUEST_SHIP_TIMEOUT = 0.1

_installed = False
_ship_after_request = False


def install(ship_after_request: bool | None = None) -> bool:
    """Register the hooks with the running uWSGI once; False when not running under uWSGI.

    ``ship_after_request=True`` makes every request ship its staged events
    once it is answered (one IPC round trip, ~0.15 ms, per request that
    recorded any), so an idle worker holds none and a SIGKILL loses nothing
    of the requests it finished; None keeps the current choice (off by
    default). The after-request hook is only picked up when
    installed while uWSGI loads the app; later calls only change the choice.
    """
    global _installed, _ship_after_request
    if ship_after_request is not None:
        _ship_after_request = bool(ship_after_request)
    if _installed:
        return True
    try:
        import uwsgi  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return False
    _register_postfork(uwsgi)
    uwsgi.atexit = _chained(_at_exit, getattr(uwsgi, "atexit", None))
    uwsgi.after_req_hook = _chained(_after_request, getattr(uwsgi, "after_req_hook", None))
    _installed = True
    return True


def installed() -> bool:
    """True once :func:`install` has registered the hooks in this uWSGI."""
    return _installed


def _register_postfork(uwsgi: Any) -> None:
    try:
        from uwsgidecorators import postfork  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except Exception:  # noqa: BLE001 - uwsgidecorators raises a bare Exception without --master
        # No master: set the raw hook, keeping one set before us.
        uwsgi.post_fork_hook = _chained(reset_after_fork, getattr(uwsgi, "post_fork_hook", None))
    else:
        postfork(reset_after_fork)


def _chained(ours: Callable[[], None], previous: Any) -> Callable[[], None]:
    if not callable(previous):
        return ours

    def hook() -> None:
        try:
            ours()
        finally:
            previous()

    return hook


def _exit_timeout() -> float:
    try:
        return Config.build().exit_timeout_s
    except InvalidConfiguration:
        return Config.exit_timeout / 1000.0


def _at_exit() -> None:
    try:
        if not close_all(_exit_timeout()):
            log.warning("samsara_mp: staged events left unshipped at uWSGI exit")
    except Exception:  # noqa: BLE001 - an exit hook must not raise
        log.exception("samsara_mp: shipping at uWSGI exit failed")


def _after_request() -> None:
    if not _ship_after_request:
        return
    try:
        ship_all(_REQUEST_SHIP_TIMEOUT)
    except Exception:  # noqa: BLE001 - never fail the next request over analytics
        log.exception("samsara_mp: shipping after the request failed")


install()
