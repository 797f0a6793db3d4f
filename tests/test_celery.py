"""Celery integration: real redis-server, a prefork worker recycling its children, real HTTP."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import celery  # type: ignore[import-untyped]
import pytest
from celery.result import ResultSet  # type: ignore[import-untyped]
from conftest import settled_stats, wait_until

from samsara_mp import InvalidConfiguration, Publisher
from samsara_mp.ingest import IngestServer

REPO = Path(__file__).resolve().parent.parent
N = 40
PER_CHILD = 5
# Pool children keep every event staged until they exit, so only the exit
# path under test can ship them.
LAZY = {"ship_delay": 600_000, "ship_batch": 50_000, "staging_size": 50_000}
_databases = itertools.count(1)


# ---- processes ----
def _session_members(sid: int) -> list[int]:
    """Pids of live processes in session ``sid``, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which may itself hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _env(broker: str, config: dict[str, Any], **flags: str) -> dict[str, str]:
    """This environment without SAMSARA_*, plus ``config`` as SAMSARA_MP_* and the test flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_")}
    env.update({f"SAMSARA_MP_{k.upper()}": str(v) for k, v in config.items()})
    env.update({f"SAMSARA_TEST_{k.upper()}": v for k, v in flags.items()})
    env["SAMSARA_TEST_BROKER"] = env["CELERY_BROKER_URL"] = broker
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class CeleryWorker:
    """``celery worker`` as a subprocess in a session of its own, stopped by pid."""

    def __init__(
        self,
        broker: str,
        config: dict[str, Any],
        log_dir: Path,
        app: str = "tests.apps.celery_tasks",
        cwd: Path = REPO,
        **flags: str,
    ) -> None:
        self.env = _env(broker, config, **flags)
        self.name = f"samsara-test-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self.log_path = log_dir / "celery-worker.log"
        args = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool=prefork", "--concurrency=2", f"--max-tasks-per-child={PER_CHILD}",
            "--loglevel=warning", "--without-heartbeat", "--without-gossip", "--without-mingle",
            "-n", self.name,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_idle(self, app: Any) -> None:
        """Wait until the main process has taken every result from its children.

        A result reaches the backend before the main process counts it, and a
        child that leaves first waits until its results are counted (up to
        30 s, billiard's ``_ensure_messages_consumed``). A warm shutdown stops
        the counting, so without this wait it can stall for those 30 s.
        """
        inspect = app.control.inspect(destination=[self.name], timeout=1.0)
        wait_until(lambda: (inspect.active() or {}).get(self.name) == [], 20, "an idle worker")

    def warm_shutdown(self, timeout: float = 30) -> int:
        """SIGTERM (Celery's warm shutdown) and wait; SIGKILL only as a last resort."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            tail = self.log_tail()
            raise AssertionError(f"worker ignored SIGTERM for {timeout}s:\n{tail}") from None

    def kill_leftovers(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for pid in _session_members(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run_tasks(broker: str, worker: CeleryWorker, n: int) -> list[int]:
    """Send ``n`` tasks and wait for every result; the pool pids that ran them."""
    app = celery.Celery("samsara_test_client", broker=broker, backend=broker)
    try:
        results = [app.send_task("samsara_test.record_number", args=[i]) for i in range(n)]
        try:
            pids = list(ResultSet(results, app=app).get(timeout=60))
        except Exception as exc:
            raise AssertionError(f"tasks did not finish: {exc!r}\n{worker.log_tail()}") from exc
        worker.wait_idle(app)
        return pids
    finally:
        app.close()


# ---- helpers ----
def _balanced(stats: dict[str, Any]) -> bool:
    left = stats["delivered"] + stats["dropped_overflow"] + stats["rejected"] + stats["buffered"]
    return bool(stats["recorded"] == left)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _task_numbers(server: IngestServer) -> Counter[int]:
    return Counter(e["n"] for e in server.events() if e["eventName"] == "celery.task")


@pytest.fixture
def broker(redis_url: str) -> str:
    """A database of its own on the session's redis-server (conftest's redis_url)."""
    return f"{redis_url}/{next(_databases)}"


# ---- tests ----
def test_prefork_worker_owns_the_publisher_and_every_task_event_arrives_once(
    server: IngestServer, fast_config: dict[str, Any], broker: str, tmp_path: Path
) -> None:
    worker = CeleryWorker(broker, fast_config, tmp_path)
    try:
        pids = _run_tasks(broker, worker, N)
        assert len(set(pids)) >= N // PER_CHILD, f"children were not recycled: {Counter(pids)}"
        # The worker's main process started the publisher and owns it.
        channel_view = Publisher(**fast_config)
        info = wait_until(channel_view.channel.read_info, 10, "publisher.json")
        assert info["owner_pid"] == worker.pid
        stats = settled_stats(channel_view, N)
        assert stats["delivered"] == N and stats["dropped_overflow"] == stats["rejected"] == 0
        assert _balanced(stats)
        assert worker.warm_shutdown() == 0, worker.log_tail()
        # Its worker_shutdown handler stopped the publisher, draining it.
        wait_until(lambda: not _alive(info["pid"]), 15, "the owned publisher to exit")
    finally:
        worker.kill_leftovers()
    assert _task_numbers(server) == Counter(range(N))
    assert server.event_count() == N
    assert not list((Path(channel_view.channel.dir) / "spool").glob("*.jsonl"))


def test_events_a_recycled_child_still_stages_are_shipped_as_it_exits(
    server: IngestServer,
    publisher: Publisher,
    fast_config: dict[str, Any],
    broker: str,
    tmp_path: Path,
) -> None:
    """worker_process_shutdown alone (no postrun ship, lazy shipper) saves every event."""
    worker = CeleryWorker(
        broker, dict(fast_config, **LAZY), tmp_path, own_publisher="0", ship_after_task="0"
    )
    try:
        pids = _run_tasks(broker, worker, N)
        assert len(set(pids)) >= N // PER_CHILD, f"children were not recycled: {Counter(pids)}"
        assert worker.warm_shutdown() == 0, worker.log_tail()
    finally:
        worker.kill_leftovers()
    stats = settled_stats(publisher, N)
    assert stats["delivered"] == N and _balanced(stats)
    assert _task_numbers(server) == Counter(range(N))
    assert server.event_count() == N


def test_without_the_integration_billiard_children_exit_past_every_exit_hook(
    server: IngestServer,
    publisher: Publisher,
    fast_config: dict[str, Any],
    broker: str,
    tmp_path: Path,
) -> None:
    """The control: billiard ends a child with os._exit, so atexit and finalizers never run."""
    worker = CeleryWorker(broker, dict(fast_config, **LAZY), tmp_path, integration="0")
    try:
        pids = _run_tasks(broker, worker, N)
        assert len(set(pids)) >= N // PER_CHILD, f"children were not recycled: {Counter(pids)}"
        assert worker.warm_shutdown() == 0, worker.log_tail()
    finally:
        worker.kill_leftovers()
    assert publisher.stats()["recorded"] == 0
    assert server.event_count() == 0


def test_the_celery_example_delivers_every_event(
    server: IngestServer, fast_config: dict[str, Any], broker: str, tmp_path: Path
) -> None:
    example = REPO / "examples" / "celery"
    worker = CeleryWorker(broker, fast_config, tmp_path, app="tasks", cwd=example)
    try:
        queued = subprocess.run(
            [sys.executable, "tasks.py", "20"], cwd=example, env=worker.env,
            capture_output=True, text=True, timeout=90,
        )
        assert queued.returncode == 0, queued.stderr + worker.log_tail()
        assert "20 images resized" in queued.stdout
        control = celery.Celery("samsara_test_control", broker=broker)
        try:
            worker.wait_idle(control)
        finally:
            control.close()
        assert worker.warm_shutdown() == 0, worker.log_tail()
    finally:
        worker.kill_leftovers()
    events = server.events()
    assert sorted(e["image_id"] for e in events) == sorted(f"img-{i}" for i in range(20))
    assert {(e["eventName"], e["sourceId"]) for e in events} == {("image.resized", "celery-example")}


def test_setup_refuses_unknown_keys_and_bad_timeouts_before_connecting_anything() -> None:
    from samsara_mp.integrations import celery as integration

    with pytest.raises(InvalidConfiguration) as info:
        integration.setup(publish_intervall=50)
    assert info.value.key == "publish_intervall"
    with pytest.raises(InvalidConfiguration) as info:
        integration.setup(ship_timeout=-1)
    assert info.value.key == "ship_timeout"
    assert integration._settings is None  # nothing was connected
