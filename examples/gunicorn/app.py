"""A WSGI app that records one ``page.view`` event per request with samsara_mp.

Every worker uses the process's shared client; it ships to the publisher
that the gunicorn master owns (see gunicorn.conf.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from samsara_mp import get_client

# Created at import: in the master with preload_app, and reset in each worker after the fork.
client = get_client()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    client.record_event(
        eventName="page.view", path=environ.get("PATH_INFO", "/"), worker=os.getpid()
    )
    body = b"recorded\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
