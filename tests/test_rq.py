"""RQ integration: a real ``rq worker --burst`` on a real redis-server, a horse per job, real HTTP."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import settled_stats, wait_until
from procs import alive, stop
from redis import Redis
from rq import Queue

from samsara_mp import Publisher
from samsara_mp.ingest import IngestServer

REPO = Path(__file__).resolve().parent.parent
JOBS = 20
PER_JOB = 200
# Horses keep every event staged until the job ends: the shipper neither fills a
# batch nor reaches its delay, so only the end-of-job path under test can ship.
LAZY = {"ship_delay": 600_000, "ship_batch": 50_000, "staging_size": 50_000}
# What each job does after recording: most return; two raise; one outlives its timeout.
ENDINGS = {3: "raise", 11: "raise", 7: "hang"}
_databases = itertools.count(10)  # test_celery.py counts from 1


@pytest.fixture
def broker(redis_url: str) -> str:
    """A database of its own on the session's redis-server (conftest's redis_url)."""
    url = f"{redis_url}/{next(_databases)}"
    Redis.from_url(url).flushdb()
    return url


def _enqueue(broker: str, jobs: int = JOBS) -> list[Any]:
    queue = Queue("samsara", connection=Redis.from_url(broker))
    return [
        queue.enqueue("tests.apps.rq_jobs.record", job, PER_JOB, ENDINGS.get(job, "return"),
                      job_timeout=1 if ENDINGS.get(job) == "hang" else 60)
        for job in range(jobs)
    ]


def _run_burst_worker(broker: str, config: dict[str, Any], log_dir: Path,
                      worker_class: str | None = "samsara_mp.integrations.rq.Worker",
                      until: Any = None) -> int | None:
    """``rq worker --burst`` until the queue is empty; its exit status. Stopped by pid.
    With ``until``: only until that holds, then stopped (RQ's own exit can wait out its
    pubsub thread's 60 s read, which says nothing about what the horses shipped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_")}
    env.update({f"SAMSARA_MP_{k.upper()}": str(v) for k, v in config.items()})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", broker,
            "samsara"]
    if worker_class:
        args[4:4] = ["--worker-class", worker_class]
    log_path = log_dir / "rq-worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    try:
        if until is not None:
            wait_until(until, 60, "the jobs to end")
            return None
        code = proc.wait(120)
    finally:
        stop(proc)
    assert code == 0, log_path.read_text(errors="replace")[-3000:]
    return code


def _events(server: IngestServer) -> Counter[tuple[int, int]]:
    return Counter((e["job"], e["n"]) for e in server.events() if e["eventName"] == "rq.job")


def _check_jobs(jobs: list[Any]) -> None:
    """Each job ended as planned, each returning job in a horse of its own."""
    for job in jobs:
        job.refresh()
    statuses = Counter(job.get_status().value for job in jobs)
    assert statuses == Counter(finished=JOBS - len(ENDINGS), failed=len(ENDINGS)), statuses
    timed_out = [job for job in jobs if "JobTimeoutException" in (job.latest_result().exc_string or "")]
    assert len(timed_out) == 1
    pids = [job.return_value() for job in jobs if job.get_status().value == "finished"]
    assert len(set(pids)) == len(pids), f"a horse ran two jobs: {pids}"


EVERY = Counter((job, n) for job in range(JOBS) for n in range(PER_JOB))


def test_worker_owns_the_publisher_and_every_event_of_every_job_arrives_once(
    server: IngestServer, fast_config: dict[str, Any], broker: str, tmp_path: Path
) -> None:
    # The default publish_interval (30 s): only the owner's drain sends before it.
    config = dict(fast_config, publish_interval=30_000, min_buffer_size=100_000, **LAZY)
    jobs = _enqueue(broker)
    _run_burst_worker(broker, config, tmp_path)
    _check_jobs(jobs)
    # The burst worker stopped the publisher it started, with a drain: all is there already.
    assert _events(server) == EVERY
    assert server.event_count() == JOBS * PER_JOB
    channel = Publisher(**config).channel
    assert channel.read_info() is None, "the worker left its publisher running"
    assert len(list(channel.ended_dir.iterdir())) == 1, "no publisher, or one that did not end cleanly"


def test_a_worker_that_finds_a_publisher_asks_it_to_send_as_it_leaves(
    server: IngestServer, fast_config: dict[str, Any], broker: str, tmp_path: Path
) -> None:
    # The default publish_interval (30 s): only the worker's leaving makes it send.
    config = dict(fast_config, publish_interval=30_000, min_buffer_size=100_000)
    with Publisher(**config) as publisher:
        jobs = _enqueue(broker)
        _run_burst_worker(broker, dict(config, **LAZY), tmp_path)
        _check_jobs(jobs)
        wait_until(lambda: server.event_count() >= JOBS * PER_JOB, 10, "every event delivered")
        assert publisher.pid is not None and alive(publisher.pid), "it stopped a publisher it did not own"
        stats = settled_stats(publisher, JOBS * PER_JOB)
        assert stats["delivered"] == JOBS * PER_JOB
    assert _events(server) == EVERY


def test_without_the_worker_class_a_horse_exits_past_every_exit_hook(
    server: IngestServer, publisher: Publisher, fast_config: dict[str, Any], broker: str, tmp_path: Path
) -> None:
    """The control: RQ's horse ends with os._exit, so atexit and finalizers never run."""
    jobs = _enqueue(broker, 4)

    def ended() -> bool:
        return all(job.get_status(refresh=True).value in ("finished", "failed") for job in jobs)

    _run_burst_worker(broker, dict(fast_config, **LAZY), tmp_path, worker_class=None, until=ended)
    assert publisher.stats()["recorded"] == 0
    assert server.event_count() == 0
