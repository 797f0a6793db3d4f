"""ASGI apps for tests/test_frameworks.py: one event per ``?rid=N`` request; answers the pid.

- ``raw:application``-style ``application``: a plain ASGI app that ignores the
  lifespan scope, wrapped in ``SamsaraLifespan`` (which then answers it);
- ``starlette_app``: a Starlette app whose ``lifespan=`` is samsara_mp's.

Settings come from SAMSARA_MP_* variables; sourceId is given here, so a test
can tell that the lifespan made each worker's client.
"""

from __future__ import annotations

import functools
import os
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from samsara_mp import get_client
from samsara_mp.integrations.asgi import SamsaraLifespan, lifespan


async def raw(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return  # no lifespan support of its own: SamsaraLifespan answers it
    query = parse_qs(scope.get("query_string", b"").decode())
    if "rid" in query:
        get_client().record_event(eventName="test.request", rid=int(query["rid"][0]), pid=os.getpid())
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


application = SamsaraLifespan(raw, sourceId="asgi-raw")


async def record(request: Request) -> PlainTextResponse:
    rid = request.query_params.get("rid")
    if rid is not None:
        get_client().record_event(eventName="test.request", rid=int(rid), pid=os.getpid())
    return PlainTextResponse(str(os.getpid()))


starlette_app = Starlette(routes=[Route("/", record)],
                          lifespan=functools.partial(lifespan, sourceId="asgi-starlette"))
