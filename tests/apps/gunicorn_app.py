"""WSGI app for tests/test_gunicorn.py: one event per ``?rid=N`` request; answers the worker pid.

The client is created at import, so with ``preload_app`` it is created in the
master and reset in each forked worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from samsara_mp import get_client

client = get_client()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "rid" in query:
        client.record_event(eventName="test.request", rid=int(query["rid"][0]), pid=os.getpid())
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
