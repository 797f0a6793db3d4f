"""A FastAPI app whose lifespan makes samsara_mp's client at startup and ships at shutdown."""

from __future__ import annotations

import functools
import os

from fastapi import FastAPI

from samsara_mp import get_client
from samsara_mp.integrations.asgi import lifespan

# Keys given here; the rest (the url) from SAMSARA_MP_* variables.
app = FastAPI(lifespan=functools.partial(lifespan, sourceId="fastapi-example", publish_interval=1_000))


@app.get("/hello")
async def hello() -> dict[str, str]:
    get_client().record_event(eventName="page.view", path="/hello", worker=os.getpid())  # never blocks
    return {"status": "recorded"}
