"""The sidecar recipe: ``samsara-mp publisher`` in its own process tree serves workers
of another one through a shared runtime directory, the workers never starting one.

What a container pair (or a Kubernetes pod with a shared ``emptyDir``) does:
two process trees of one uid that share only the runtime directory. The
workers start first, as containers of a pod may, and stage their events
until the publisher comes up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import wait_until
from procs import alive, children, kill_if

from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer

APPS = Path(__file__).resolve().parent / "apps"
ROOT = APPS.parent.parent
WORKERS, EVENTS = 3, 2_000


def test_a_publisher_of_another_process_tree_delivers_every_event_of_workers_that_never_start_one(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    shared = os.path.join(runtime_dir, "shared")  # the emptyDir's mount point, say
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        SAMSARA_MP_URL=server.url,
        SAMSARA_MP_RUNTIME_DIR=shared,
        SAMSARA_MP_SEND_CLIENT_STATS="false",
    )
    marks = tmp_path / "marks"
    marks.touch()
    channel = Channel(Config.build(env={}, url=server.url, runtime_dir=shared))
    with open(tmp_path / "workers.log", "wb") as log:
        workers = subprocess.Popen(
            [sys.executable, str(APPS / "separate_workers.py"), str(WORKERS), str(EVENTS), str(marks)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    publisher: subprocess.Popen[bytes] | None = None
    seen: set[int] = set()
    try:
        wait_until(lambda: len(marks.read_text().split()) == WORKERS or workers.poll() is not None,
                   30, "every worker to record its events")
        seen |= children(workers.pid)
        assert workers.poll() is None, (tmp_path / "workers.log").read_text()
        assert channel.read_info() is None and server.events() == [], "no worker started a publisher"

        with open(tmp_path / "publisher.log", "wb") as log:
            publisher = subprocess.Popen(
                [sys.executable, "-m", "samsara_mp", "publisher", "--publish-interval", "100",
                 "--min-buffer-size", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        assert workers.wait(90) == 0, (tmp_path / "workers.log").read_text()
        info = channel.read_info()
        assert info is not None and info["pid"] == publisher.pid and info["owner_pid"] is None
        assert oct(os.stat(channel.dir).st_mode & 0o777) == "0o700"
        files = set(os.listdir(channel.dir))
        assert {"authkey", "publisher.json", "publisher.lock", "publisher.sock"} <= files, files

        publisher.send_signal(signal.SIGTERM)
        assert publisher.wait(30) == 0, (tmp_path / "publisher.log").read_text()
    finally:
        for proc in (workers, publisher):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for pid in seen:
            kill_if(pid, "separate_workers")
    assert not [pid for pid in seen if alive(pid)]
    events = server.events()
    per_worker = Counter(e["worker"] for e in events)
    assert per_worker == {i: EVENTS for i in range(WORKERS)}, per_worker
    assert len({(e["worker"], e["seq"]) for e in events}) == len(events) == WORKERS * EVENTS
