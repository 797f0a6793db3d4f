"""WSGI app for tests/test_uwsgi.py: one event per ``?rid=N`` request; answers the worker pid.

Loaded in the uWSGI master before the workers are forked, so the client is
created there and reset in each worker by the integration's post-fork hook.
The ``X-Shipper`` header says how this worker's client ships;
SMP_TEST_SHIP_AFTER_REQUEST=1 turns on shipping after every request;
SMP_TEST_AFTER_REQUEST_DELAY=<seconds> makes uWSGI's after-request hook sleep,
holding the worker busy after its answer was sent (uWSGI closes the client's
connection before it runs the hook). ``?hash=X`` hashes X with hashlib (OpenSSL).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from samsara_mp import get_client
from samsara_mp.integrations import uwsgi as samsara_uwsgi  # importing registers the hooks

if os.environ.get("SMP_TEST_SHIP_AFTER_REQUEST") == "1":
    samsara_uwsgi.install(ship_after_request=True)

_delay = float(os.environ.get("SMP_TEST_AFTER_REQUEST_DELAY", "0"))
if _delay:
    import time

    import uwsgi  # type: ignore[import-untyped, import-not-found, unused-ignore]

    _previous = uwsgi.after_req_hook

    def _slow_after_request() -> None:
        time.sleep(_delay)
        _previous()

    uwsgi.after_req_hook = _slow_after_request

client = get_client()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "hash" in query:
        # What a real app does when it first signs a session or a CSRF token in
        # a worker: hashlib, imported there, initialises OpenSSL, which
        # registers its cleanup with atexit() after uWSGI's exit hook.
        import hashlib

        hashlib.sha256(query["hash"][0].encode()).digest()
    if "rid" in query:
        client.record_event(eventName="test.request", rid=int(query["rid"][0]), pid=os.getpid())
    body = str(os.getpid()).encode()
    start_response("200 OK", [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
        ("X-Shipper", "thread" if client.threaded else "inline"),
    ])
    return [body]
