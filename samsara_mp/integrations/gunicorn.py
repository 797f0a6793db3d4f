"""gunicorn integration: the master owns the channel's publisher, workers ship to it.

In the data flow of docs/design.md the gunicorn arbiter (master) is the explicit owner
of the publisher process: ``on_starting`` starts it before any worker is
forked and ``on_exit`` stops it with a drain after the workers have left.
Workers record with the process's shared client (``samsara_mp.get_client()``),
which ``post_fork`` resets after the fork and ``worker_exit`` ships before the
worker ends. Use it from ``gunicorn.conf.py``::

    from samsara_mp.integrations.gunicorn import on_starting, post_fork, worker_exit, on_exit

``post_request`` (opt-in) also ships after every request. :func:`chain`
combines these hooks with your own.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from .. import process
from .._env import ENV_PREFIX, callable_path, export_to_env
from ..client import reset_after_fork, ship_all
from ..config import Config, check_keys
from ..errors import ChannelError, ChannelTaken, InvalidConfiguration
from ..ipc import IPCError
from ..publisher import Publisher

__all__ = [
    "configure",
    "chain",
    "on_starting",
    "on_exit",
    "post_fork",
    "worker_exit",
    "post_request",
    "publisher",
]

# A valid stand-in, used only to validate settings before the url is known.
_PLACEHOLDER_URL = "http://127.0.0.1/"

# post_request gives up retrying after this long; one attempt is bounded by ipc_timeout.
_REQUEST_SHIP_TIMEOUT = 0.1

_publisher: Publisher | None = None
_exit_timeout: tuple[int, float] | None = None  # (pid, seconds)

if "gunicorn.arbiter" in sys.modules:
    # Loaded from gunicorn.conf.py: this master's on_starting owns the publisher,
    # so a client made while it loads the app (preload_app) leaves the start to it.
    process.expect_owner()


def configure(**config: Any) -> None:
    """Set samsara_mp's settings for this gunicorn app; call it in ``gunicorn.conf.py``.

    Takes :class:`~samsara_mp.Config` keys, checks them now and exports them
    as ``SAMSARA_MP_<KEY>`` variables of the master, so that the master's
    publisher and every worker's ``samsara_mp.get_client()`` build the same
    configuration (a value of None removes the variable). gunicorn's
    ``raw_env`` setting does the same from strings. Raises
    ``InvalidConfiguration`` for an unknown key or an invalid value.
    """
    global _exit_timeout
    process.expect_owner()
    check_keys(config)
    given = {k: v for k, v in config.items() if v is not None}
    Config.build(**({"url": os.environ.get(ENV_PREFIX + "URL", _PLACEHOLDER_URL)} | given))
    hook = config.get("before_send")
    if callable(hook) and callable_path(hook) is None:
        # Workers build their configuration from the environment: it would be lost there.
        raise InvalidConfiguration(
            "before_send", "the workers cannot import this callable; give a 'module:function' string"
        )
    export_to_env(config)
    _exit_timeout = None


def _worker_exit_timeout() -> float:
    """The ``exit_timeout`` setting in seconds, from this process's environment."""
    global _exit_timeout
    if _exit_timeout is None or _exit_timeout[0] != os.getpid():
        try:
            seconds = Config.build().exit_timeout_s
        except InvalidConfiguration:
            seconds = Config.exit_timeout / 1000.0
        _exit_timeout = (os.getpid(), seconds)
    return _exit_timeout[1]


def publisher() -> Publisher | None:
    """The publisher this master started in ``on_starting``, if any."""
    return _publisher


# ---- master hooks ----
def on_starting(server: Any) -> None:
    """Start the channel's publisher, owned by this master, and wait until it answers.

    Raises ``InvalidConfiguration`` (gunicorn does not start) when the
    settings are invalid. When another publisher already serves the channel
    (a USR2 re-exec, or a ``samsara-mp publisher`` daemon) this master does
    not own one; when the publisher cannot start, the error is logged and
    workers elect one themselves if their clients keep autostart on.
    """
    global _publisher
    if _publisher is not None and _publisher.pid is not None:
        return
    config = Config.build()
    pub = Publisher(config)
    if _answers(pub):
        server.log.info(
            "samsara_mp: a publisher already serves channel %s; this master does not own it",
            pub.channel.name,
        )
        return
    try:
        pub.start()
    except ChannelTaken as exc:
        server.log.info("samsara_mp: %s; this master does not own it", exc)
        return
    except ChannelError as exc:
        server.log.error("samsara_mp: could not start the publisher: %s", exc)
        return
    _publisher = pub
    server.log.info("samsara_mp: publisher %s serves channel %s", pub.pid, pub.channel.name)


def _answers(pub: Publisher) -> bool:
    try:
        conn = pub.channel.connect(pub.config.ipc_timeout_s)
    except (IPCError, ChannelError, OSError):
        return False
    conn.close()
    return True


def on_exit(server: Any) -> None:
    """Stop the publisher this master started, draining it; runs after the workers have left."""
    global _publisher
    pub, _publisher = _publisher, None
    if pub is None:
        return
    try:
        stats = pub.stats(timeout=pub.config.ipc_timeout_s)
    except (IPCError, ChannelError, EOFError, OSError):
        stats = None
    if stats is not None:
        server.log.info(
            "samsara_mp: stopping publisher %s: recorded=%s delivered=%s buffered=%s "
            "dropped_overflow=%s rejected=%s",
            pub.pid, stats.get("recorded"), stats.get("delivered"), stats.get("buffered"),
            stats.get("dropped_overflow"), stats.get("rejected"),
        )
    code = pub.stop()
    if code not in (0, None):
        server.log.warning("samsara_mp: publisher %s exited with status %s", pub.pid, code)


# ---- worker hooks ----
def post_fork(server: Any, worker: Any) -> None:
    """Give clients inherited from the master (``preload_app``) this worker's own state.

    ``os.register_at_fork`` already did so; calling it again is a no-op, and it
    keeps the reset in place for workers forked by other means.
    """
    reset_after_fork()


def worker_exit(server: Any, worker: Any) -> None:
    """Ship this worker's staged events to the publisher, within the ``exit_timeout`` setting.

    gunicorn calls it in the worker on every exit it sees (TERM, QUIT, INT,
    ABRT on timeout, max_requests); it also calls it in the master for a
    worker already gone, where there is nothing of that worker's to ship.
    """
    if getattr(worker, "pid", None) != os.getpid():
        return
    timeout = _worker_exit_timeout()
    try:
        if not ship_all(timeout):
            server.log.warning(
                "samsara_mp: worker %s could not ship all staged events within %.1fs",
                os.getpid(), timeout,
            )
    except Exception:  # noqa: BLE001 - a hook must not keep a worker from exiting
        server.log.exception("samsara_mp: shipping at worker exit failed")


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Opt-in: ship this worker's staged events after each request.

    One IPC round trip (~0.15 ms) per request that recorded events, so that
    they reach the publisher even if the worker is SIGKILLed right after.
    gunicorn runs it once the response is written, so a kill can still fall
    between the two; ship from the app before answering where that matters.
    While the publisher is unreachable it costs one bounded connection
    attempt per request; what it cannot ship stays staged for the shipper.
    """
    try:
        ship_all(_REQUEST_SHIP_TIMEOUT)
    except Exception:  # noqa: BLE001 - never fail a request over analytics
        worker.log.exception("samsara_mp: shipping after the request failed")


# ---- chaining ----
def chain(*hooks: Callable[..., Any]) -> Callable[..., None]:
    """One gunicorn hook that calls ``hooks`` in order, each with the arguments it takes.

    ``post_fork = chain(post_fork, my_post_fork)``. gunicorn checks a hook's
    arity, so the result declares the largest arity among ``hooks``; an
    exception from a hook propagates and the hooks after it do not run.
    """
    if not hooks:
        raise TypeError("chain() needs at least one hook")
    arities = [_arity(hook) for hook in hooks]
    width = max(arities)

    def chained(*args: Any) -> None:
        for hook, arity in zip(hooks, arities, strict=True):
            hook(*args[:arity])

    params = [
        inspect.Parameter(f"arg{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(width)
    ]
    setattr(chained, "__signature__", inspect.Signature(params))  # noqa: B010 - read by gunicorn
    chained.__name__ = "chain(" + ", ".join(getattr(h, "__name__", "hook") for h in hooks) + ")"
    return chained


def _arity(hook: Callable[..., Any]) -> int:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in inspect.signature(hook).parameters.values() if p.kind in kinds)
