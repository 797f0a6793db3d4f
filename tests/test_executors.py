"""ProcessPoolExecutor (fork, spawn, forkserver) and joblib's loky backend: the work's last
processes exit, and what their tasks recorded arrives without waiting out ``publish_interval``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from procs import alive

from samsara_mp import Publisher
from samsara_mp.ingest import IngestServer

REPO = Path(__file__).resolve().parent.parent
N = 2000
# Well under the default publish_interval (30 s), which these scripts keep.
ARRIVAL_BOUND = 10.0

_EXECUTOR = """
import multiprocessing, os, sys
from concurrent.futures import ProcessPoolExecutor
from samsara_mp import get_client

def work(n):
    get_client().record_event(eventName="exec.task", n=n)  # settings: SAMSARA_MP_* variables
    return n, os.getpid()

if __name__ == "__main__":
    count = int(sys.argv[2])
    ctx = multiprocessing.get_context(sys.argv[1])
    with ProcessPoolExecutor(2, mp_context=ctx) as executor:
        done = list(executor.map(work, range(count), chunksize=50))
    assert [n for n, _ in done] == list(range(count))
    print("workers", *sorted({pid for _, pid in done}), flush=True)
"""

_LOKY = """
import os, sys
from joblib import Parallel, delayed
from samsara_mp import get_client

def work(n):
    get_client().record_event(eventName="exec.task", n=n)
    return n, os.getpid()

if __name__ == "__main__":
    count = int(sys.argv[2])
    # Two calls on loky's reused workers; they end at this interpreter's exit.
    half = count // 2
    done = Parallel(n_jobs=2, backend="loky")(delayed(work)(n) for n in range(half))
    done += Parallel(n_jobs=2, backend="loky")(delayed(work)(n) for n in range(half, count))
    assert [n for n, _ in done] == list(range(count))
    print("workers", *sorted({pid for _, pid in done}), flush=True)
"""


def _run(script: str, method: str, server: IngestServer, runtime_dir: str, tmp_path: Path) -> float:
    """Run ``script`` with the default publish_interval; when it and its workers had ended.
    Its workers must end with it; any that did not are killed by pid, and fail the test."""
    path = tmp_path / "work.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_")}
    env.update(
        SAMSARA_MP_URL=server.url, SAMSARA_MP_RUNTIME_DIR=runtime_dir, SAMSARA_MP_CHANNEL="exec",
        SAMSARA_MP_SOURCE_ID="exec", SAMSARA_MP_SEND_CLIENT_STATS="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    proc = subprocess.Popen([sys.executable, str(path), method, str(N)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("workers "), err[-3000:]
        workers = [int(pid) for pid in out.split()[1:]]
        wait_until(lambda: not any(alive(pid) for pid in workers), 10, f"workers {workers} to end")
        return time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _arrive_once(server: IngestServer, ended: float) -> None:
    wait_until(lambda: server.event_count() >= N, ARRIVAL_BOUND, f"{N} events within {ARRIVAL_BOUND}s")
    waited = time.monotonic() - ended  # from the end of the work's last process
    assert Counter(e["n"] for e in server.events()) == Counter(range(N))
    assert server.event_count() == N
    assert waited < ARRIVAL_BOUND


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_process_pool_executor_events_arrive_once_soon_after_shutdown(
    method: str, server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    ended = _run(_EXECUTOR, method, server, runtime_dir, tmp_path)
    _arrive_once(server, ended)


def test_joblib_loky_events_arrive_once_soon_after_its_workers_end(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    ended = _run(_LOKY, "loky", server, runtime_dir, tmp_path)
    _arrive_once(server, ended)


_EXITING = """
import sys
from samsara_mp import get_client

client = get_client()
for n in range(50):
    client.record_event(eventName="exit.task", sourceId="exit", n=n)
assert client.flush(timeout=10) if sys.argv[1] == "flushed" else client.ship(timeout=10)
print("ready", flush=True)
sys.stdin.readline()  # the test freezes the publisher, then lets this process exit
"""


@pytest.mark.parametrize("before_exit", ["shipped", "flushed"])
def test_the_exit_hooks_send_now_is_bounded_and_skipped_when_nothing_waits(
    before_exit: str, server: IngestServer, fast_config: dict[str, Any], tmp_path: Path
) -> None:
    """With the publisher frozen: a process whose pushes no flush answered for asks it
    to send as it exits, within exit_timeout; one whose last flush covered everything
    connects to nothing at exit (a connection to a frozen publisher would take ipc_timeout)."""
    exit_timeout = 3.0
    config = dict(fast_config, publish_interval=30_000, min_buffer_size=100_000,
                  exit_timeout=int(exit_timeout * 1000), ipc_timeout=2_000)
    script = tmp_path / "exiting.py"
    script.write_text(_EXITING)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_")}
    env.update({f"SAMSARA_MP_{k.upper()}": str(v) for k, v in config.items()})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with Publisher(**config) as publisher:
        assert publisher.pid is not None
        proc = subprocess.Popen([sys.executable, str(script), before_exit], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""
            os.kill(publisher.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                proc.stdin.write("exit\n")
                proc.stdin.flush()
                assert proc.wait(exit_timeout + 10) == 0
                took = time.monotonic() - started
            finally:
                os.kill(publisher.pid, signal.SIGCONT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if before_exit == "flushed":
            assert took < 1.0, f"a process with nothing waiting took {took:.2f}s to exit"
        else:
            assert took < exit_timeout + 1.0, f"the exit took {took:.2f}s, past exit_timeout"
        assert publisher.stats()["recorded"] == 50  # the rest is the drain's, on the way out
    assert Counter(e["n"] for e in server.events()) == Counter(range(50))
