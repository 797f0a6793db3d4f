"""gunicorn config for tests/test_gunicorn.py: samsara_mp's hooks, one chained with a test hook.

Settings come from SAMSARA_MP_* variables; SMP_TEST_POST_REQUEST=1 adds the
opt-in ``post_request`` hook, and SMP_TEST_MARKS names a file where each
booted worker appends its pid (to show that a chained user hook ran).
"""

from __future__ import annotations

import os
from typing import Any

from samsara_mp.integrations import gunicorn as smp

worker_class = "sync"
workers = 4
graceful_timeout = 10
timeout = 30
loglevel = "info"

smp.configure(exit_timeout=5_000)

on_starting = smp.on_starting
on_exit = smp.on_exit
worker_exit = smp.worker_exit


def _mark_worker(server: Any, worker: Any) -> None:
    path = os.environ.get("SMP_TEST_MARKS")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


post_fork = smp.chain(smp.post_fork, _mark_worker)

if os.environ.get("SMP_TEST_POST_REQUEST") == "1":
    post_request = smp.post_request

# gunicorn >= 24 opens a control socket under ~/.gunicorn by default; tests run many masters.
control_socket_disable = True
