"""multiprocessing.Pool: the Pool's parent owns the publisher; each worker records.

In the data flow of docs/design.md the parent of a ``Pool`` is an explicit owner: it
holds the channel's publisher for the Pool's life (:class:`PoolPublisher`),
and each worker process gets one :func:`samsara_mp.get_client` client from
the Pool's initializer (:func:`initializer_args`)::

    with PoolPublisher(url=URL) as pub, ctx.Pool(4, **pub.pool_kwargs()) as pool:
        pool.map(work, items)

Why a SIGTERM handler. ``Pool.terminate()``, which ``with Pool() as p:`` calls
on exit, SIGTERMs the workers, and the default action ends a process without
``atexit`` or multiprocessing's finalizers, losing whatever the worker still
had staged. A worker that leaves through ``close()`` + ``join()`` or
``maxtasksperchild`` returns from ``Process.run`` and ships through the
client's own finalizer; it needs nothing from here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from types import FrameType, TracebackType
from typing import Any

from .. import ChannelTaken, Config, Publisher, SamsaraClient, get_client, ship_all

__all__ = [
    "PoolPublisher",
    "initializer_args",
    "install_sigterm_handler",
    "pool_initializer",
]

log = logging.getLogger("samsara_mp")

# How long the watcher keeps re-signalling a main thread that has not acted yet.
_POKES = 40
_POKE_INTERVAL = 0.05

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def pool_initializer(
    config: Mapping[str, Any],
    term_timeout: float,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
) -> None:
    """Pool initializer: this worker's client, the SIGTERM handler, then ``initializer(*initargs)``.

    Build its arguments with :func:`initializer_args` or
    :meth:`PoolPublisher.pool_kwargs`, which validate ``config`` in the
    parent: a Pool whose initializer raises restarts its workers forever.
    """
    get_client(**config)
    # A fork inherits the parent's wakeup fd (say, its asyncio loop's); nothing
    # in a Pool worker reads it, so the handler's watcher takes it over.
    _install(term_timeout, take_wakeup_fd=True)
    if initializer is not None:
        initializer(*initargs)


def initializer_args(
    initializer: Callable[..., object] | None = None,
    initargs: Iterable[Any] = (),
    *,
    term_timeout: float | None = None,
    **config: Any,
) -> tuple[Callable[..., None], tuple[Any, ...]]:
    """``(initializer, initargs)`` for ``Pool(...)`` that set each worker up to record.

    ``config`` (keyword > ``SAMSARA_MP_*`` environment > defaults) is
    validated here, in the parent, and handed to the workers resolved, so
    spawned workers need no environment of their own. ``term_timeout`` bounds
    the shipping on SIGTERM (default: the config's ``exit_timeout``).
    ``initializer`` and ``initargs``, if given, are the caller's own and run
    after the setup.
    """
    cfg = Config.build(**config)
    timeout = cfg.exit_timeout_s if term_timeout is None else float(term_timeout)
    return pool_initializer, (_worker_config(cfg), timeout, initializer, tuple(initargs))


def _worker_config(cfg: Config) -> dict[str, Any]:
    """The settings a Pool worker gets, ``before_send`` as given: a callable is
    pickled by reference for spawn (a lambda then fails loudly at the Pool's
    start) rather than lost, which would send the workers' events unfiltered."""
    return dict(cfg.to_dict(), before_send=cfg.before_send)


class _ShipOnTerm:
    """SIGTERM: ship staged events within ``timeout`` from a thread, then what SIGTERM did before.

    The shipping runs in a watcher thread woken through ``signal.set_wakeup_fd``,
    not in the Python-level handler, for two reasons. A Python handler runs
    only when the main thread next executes bytecode, and a Pool worker sits
    in a semaphore wait that ``Pool.terminate()`` never releases: a SIGTERM
    that lands just before that wait starts, or on another thread, would
    leave the worker blocked and ``terminate()`` joining it forever. And a
    handler that shipped from the main thread could interrupt the client's
    own shipping half-way through an IPC call. The watcher ships, then sends
    SIGTERM to the main thread again (a blocked wait returns EINTR), and the
    handler there applies the previous disposition.
    """

    def __init__(self, timeout: float, previous: _Handler) -> None:
        self.timeout = timeout
        self.previous = previous
        self._pid = os.getpid()
        self._shipped = threading.Event()
        self._acted = threading.Event()
        self._ship_lock = threading.Lock()
        self._watching = False
        self._wakeup_fd = -1

    def install(self, inherited: _ShipOnTerm | None, take_wakeup_fd: bool) -> None:
        """Become SIGTERM's handler (main thread only), and start the watcher if possible."""
        signal.signal(signal.SIGTERM, self)
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            old = -2
        if inherited is not None and old == inherited._wakeup_fd >= 0:
            os.close(old)  # a forked parent's pipe; its watcher is not in this process
            old = -1
        elif take_wakeup_fd and old >= 0:
            old = -1
        if old != -1:
            # Someone (an asyncio loop) owns the wakeup fd: keep theirs, ship from the handler.
            if old != -2:
                signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return
        self._watching = True
        self._wakeup_fd = w
        watcher = threading.Thread(target=self._watch, args=(r,), name="samsara-mp-sigterm")
        watcher.daemon = True
        watcher.start()

    def _ship(self) -> None:
        with self._ship_lock:
            if self._shipped.is_set():
                return
            try:
                ship_all(self.timeout)
            except Exception:  # noqa: BLE001 - SIGTERM's own effect must still follow
                log.exception("samsara_mp: shipping on SIGTERM failed")
            finally:
                self._shipped.set()

    def _watch(self, fd: int) -> None:
        main = threading.main_thread().ident
        while True:
            try:
                data = os.read(fd, 512)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM not in data or self.previous == signal.SIG_IGN:
                continue
            self._ship()
            for _ in range(_POKES):
                if self._acted.is_set() or main is None:
                    break
                signal.pthread_kill(main, signal.SIGTERM)
                self._acted.wait(_POKE_INTERVAL)
            else:
                if not callable(self.previous):
                    log.warning("samsara_mp: main thread did not take SIGTERM; exiting")
                    os._exit(128 + signal.SIGTERM)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() == self._pid:
            if not self._watching:
                self._ship()
            if not self._shipped.is_set():
                return  # the watcher is shipping; it signals this thread again when done
        self._acted.set()
        previous = self.previous
        if callable(previous):
            previous(signum, frame)
            return
        if previous == signal.SIG_IGN:
            return
        # Die by the signal itself, so the parent sees the same status as before.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # only if every thread blocks the signal


def install_sigterm_handler(timeout: float = 5.0) -> None:
    """On SIGTERM, ship this process's staged events (within ``timeout``), then act as before.

    What SIGTERM did before is kept: the default still ends the process by
    SIGTERM (same exit status), a Python handler is called afterwards, an
    ignored SIGTERM stays ignored. Idempotent; call it from the main thread
    (Python's rule for signal handlers). It takes the process's
    ``signal.set_wakeup_fd`` unless something else (an asyncio loop) holds it
    already; then it ships from the handler itself.
    """
    _install(timeout, take_wakeup_fd=False)


def _install(timeout: float, take_wakeup_fd: bool) -> None:
    current = signal.getsignal(signal.SIGTERM)
    if isinstance(current, _ShipOnTerm) and current._pid == os.getpid():
        current.timeout = timeout
        return
    inherited = current if isinstance(current, _ShipOnTerm) else None
    previous = inherited.previous if inherited is not None else current
    _ShipOnTerm(timeout, previous).install(inherited, take_wakeup_fd)


class PoolPublisher:
    """The Pool parent's hold on the channel's publisher, as a context manager.

    On enter it starts the publisher, or uses the one the channel already has.
    On exit, after the Pool's own exit has ended the workers, it ships the
    parent's staged events and then stops the publisher it started, which
    drains the buffer to the API within ``shutdown_timeout``; a publisher it
    did not start is asked to flush instead, and left running.
    """

    def __init__(self, *, term_timeout: float | None = None, **config: Any) -> None:
        self.config = Config.build(**config)
        self.term_timeout = (
            self.config.exit_timeout_s if term_timeout is None else float(term_timeout)
        )
        self.publisher = Publisher(self.config)
        self.owned = False

    def start(self, timeout: float = 15.0) -> PoolPublisher:
        """Start the publisher; raise ``ChannelError`` unless it or another one answers."""
        try:
            self.publisher.start(timeout)
        except ChannelTaken as exc:
            log.info("samsara_mp: %s; using it", exc)
            self.owned = False
        else:
            self.owned = True
        return self

    def initializer_args(
        self, initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = ()
    ) -> tuple[Callable[..., None], tuple[Any, ...]]:
        """``(initializer, initargs)`` giving each worker a client of this channel."""
        args = (_worker_config(self.config), self.term_timeout, initializer, tuple(initargs))
        return pool_initializer, args

    def pool_kwargs(
        self, initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = ()
    ) -> dict[str, Any]:
        """``{"initializer": ..., "initargs": ...}`` to splat into ``Pool(...)``."""
        init, args = self.initializer_args(initializer, initargs)
        return {"initializer": init, "initargs": args}

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The channel's counters, from its publisher."""
        return self.publisher.stats(timeout)

    def stop(self, timeout: float | None = None) -> bool:
        """Ship the parent's events, then stop (or flush) the publisher; True when all left.

        ``timeout`` bounds the drain; by default the publisher's own
        ``shutdown_timeout`` plus one ``send_timeout``.
        """
        cfg = self.config
        shipped = ship_all(cfg.ipc_timeout_s)
        if self.owned:
            self.owned = False
            return self.publisher.stop(timeout) == 0 and shipped
        if timeout is None:
            timeout = cfg.shutdown_timeout_s + cfg.send_timeout_s
        with SamsaraClient(**dict(cfg.to_dict(), start_publishing_thread=False)) as probe:
            return probe.flush(timeout) and shipped

    def __enter__(self) -> PoolPublisher:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
