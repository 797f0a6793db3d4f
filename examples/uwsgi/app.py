"""A WSGI app that records one ``page.view`` event per request with samsara_mp.

uwsgi.ini imports ``samsara_mp.integrations.uwsgi`` in the master, which
registers the post-fork reset and the exit shipping; the app needs nothing
else. The first worker that ships elects the channel's publisher.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from samsara_mp import get_client

# Created in the master (uWSGI loads the app before forking), reset in each worker.
client = get_client()

# Opt-in: ship every request's events before the worker takes the next request.
# from samsara_mp.integrations import uwsgi as samsara_uwsgi
# samsara_uwsgi.install(ship_after_request=True)


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    client.record_event(
        eventName="page.view", path=environ.get("PATH_INFO", "/"), worker=os.getpid()
    )
    body = b"recorded\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
