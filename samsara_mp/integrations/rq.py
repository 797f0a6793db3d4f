"""RQ: the worker's main process owns the publisher; each work horse ships its job's events.

An explicit owner in docs/design.md ("Election and cold start"): ``rq worker --worker-class
samsara_mp.integrations.rq.Worker``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

import rq.worker

from .. import ChannelError, ChannelTaken, Config, Publisher, SamsaraClient, close_all, process, ship_all
from .._env import export_to_env

__all__ = ["SamsaraWorkerMixin", "Worker"]

log = logging.getLogger("samsara_mp")

if TYPE_CHECKING:
    _Base = rq.worker.BaseWorker
else:
    _Base = object


class SamsaraWorkerMixin(_Base):
    """Put before any RQ worker class: ``class MyWorker(SamsaraWorkerMixin, rq.worker.Worker)``.

    Why each override exists. RQ's work horse is a fork per job (or a
    ``posix_spawn`` for ``SpawnWorker``) whose ``main_work_horse`` ends with
    ``os._exit``: no ``atexit``, no finalizer, so whatever the job staged died
    with it. :meth:`perform_job` runs in the horse for every job, whether it
    returned, raised, or was stopped by RQ's job timeout (a ``JobTimeoutException``
    raised in the job by SIGALRM): after it, the horse closes its clients
    (ships, bounded by ``exit_timeout``; what could not be shipped is counted
    ``dropped_staging`` by a reachable publisher). A horse killed by SIGKILL
    (a cold shutdown, ``send_stop_job_command``, a job stuck in C past its
    timeout + 60 s) loses only what its shipper thread had not pushed yet
    (``ship_delay``, 5 ms by default), uncounted.

    :meth:`work` runs in the worker's main process: it starts the channel's
    publisher before the first fork (or uses the one the channel has) and, as
    the worker leaves (``--burst`` done, a warm or cold shutdown), stops it
    with a drain, or asks the one it did not start to send now.

    Settings: ``samsara_config`` (a class attribute, keys as for
    ``SamsaraClient``), then the ``SAMSARA_MP_*`` environment, then the defaults.
    """

    samsara_config: ClassVar[dict[str, Any]] = {}

    def work(self, *args: Any, **kwargs: Any) -> bool:
        publisher = self._samsara_start()
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            if not self.is_horse:
                _samsara_stop(self._samsara_settings(), publisher)

    def perform_job(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return bool(super().perform_job(*args, **kwargs))
        finally:
            self._samsara_job_ended()

    def _samsara_settings(self) -> Config:
        return Config.build(**self.samsara_config)

    def _samsara_start(self) -> Publisher | None:
        cfg = self._samsara_settings()  # a bad setting stops the worker here, naming the key
        if self.samsara_config:
            # Horses forked or spawned from here build the same configuration from get_client().
            export_to_env(self.samsara_config)
        if cfg.disabled:
            return None
        process.expect_owner()  # clients made in this process leave the start to us
        publisher = Publisher(cfg)
        try:
            publisher.start()
        except ChannelTaken as exc:
            log.info("samsara_mp: %s; this RQ worker uses it", exc)
            return None
        except (ChannelError, OSError) as exc:
            log.warning("samsara_mp: this RQ worker could not start the publisher (%s); "
                        "its horses elect one", exc)
            return None
        return publisher

    def _samsara_job_ended(self) -> None:
        timeout = self._samsara_settings().exit_timeout_s
        if self.is_horse:
            # os._exit follows: ship and close, so what cannot be shipped is counted.
            if not close_all(timeout):
                log.warning("samsara_mp: RQ work horse %d exits with unshipped events", os.getpid())
        else:
            ship_all(timeout)  # SimpleWorker: the job ran in this process, which goes on


def _samsara_stop(cfg: Config, publisher: Publisher | None) -> None:
    """The worker leaves: ship this process's own events, then drain the publisher
    it owns, or ask the one it found to send now (within ``shutdown_timeout``)."""
    close_all(cfg.exit_timeout_s)
    if cfg.disabled:
        return
    if publisher is not None:
        code = publisher.stop()
        if code:
            log.warning("samsara_mp: publisher exited with status %s", code)
        return
    with SamsaraClient(**dict(cfg.to_dict(), start_publishing_thread=False)) as probe:
        if not probe.flush(cfg.shutdown_timeout_s):
            log.warning("samsara_mp: the channel's publisher did not confirm sending "
                        "before this RQ worker left")


class Worker(SamsaraWorkerMixin, rq.worker.Worker):
    """RQ's forking ``Worker`` with samsara_mp.

    ``rq worker --worker-class samsara_mp.integrations.rq.Worker``
    """
