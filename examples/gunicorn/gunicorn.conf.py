"""gunicorn settings for the example app, wired to samsara_mp.

Run from this directory, with SAMSARA_MP_URL pointing at the Ingestion API:
    gunicorn -c gunicorn.conf.py app:app
"""

from __future__ import annotations

from typing import Any

from samsara_mp.integrations import gunicorn as samsara

bind = "127.0.0.1:8000"
workers = 4
preload_app = True

# Config keys; exported to the workers as SAMSARA_MP_* variables. The url comes
# from SAMSARA_MP_URL here, so the same file serves every environment.
samsara.configure(sourceId="example-web", publish_interval=1_000)

on_starting = samsara.on_starting  # the master starts the channel's publisher
on_exit = samsara.on_exit  # ...and stops it with a drain, after the workers left
worker_exit = samsara.worker_exit  # each worker ships what it has staged as it leaves


def announce(server: Any, worker: Any) -> None:
    server.log.info("worker %s records events with samsara_mp", worker.pid)


# Your own hook runs after samsara_mp's.
post_fork = samsara.chain(samsara.post_fork, announce)

# Opt-in: ship after every request (one IPC round trip each), so a SIGKILLed
# worker loses nothing it had answered before.
# post_request = samsara.post_request
