"""ASGI (FastAPI, Starlette, any ASGI app): build the client at startup, ship at shutdown.

Two forms of one lifespan, for servers that run the ASGI ``lifespan``
protocol (uvicorn, gunicorn's ``UvicornWorker``, hypercorn):

- :func:`lifespan`, an async context manager usable as FastAPI's or
  Starlette's ``lifespan=`` (or entered from your own lifespan);
- :class:`SamsaraLifespan`, a wrapper around any ASGI app that answers the
  ``lifespan`` scope itself when the app does not, and passes every other
  scope through untouched.

At startup the process's shared client (:func:`samsara_mp.get_client`) is
made from the given keys and the environment; making it starts no thread and
waits for nothing. At shutdown its staged events are shipped to the publisher
with ``await client.aclose(timeout)``, which runs the blocking part in a
worker thread, so the loop keeps serving the requests still in flight;
``timeout`` defaults to the ``exit_timeout`` setting. ``record_event`` stays
synchronous in async handlers: it never waits on the publisher or the network.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from ..client import SamsaraClient, get_client

__all__ = ["lifespan", "SamsaraLifespan", "start", "stop"]

log = logging.getLogger("samsara_mp")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def start(**config: Any) -> SamsaraClient:
    """Make (or return) the process's client; raises ``InvalidConfiguration`` for a bad key."""
    return get_client(**config)


async def stop(client: SamsaraClient, timeout: float | None = None) -> bool:
    """Ship ``client``'s staged events and close it, off the loop; True when nothing was left."""
    shipped = await client.aclose(client.exit_timeout_s if timeout is None else timeout)
    if not shipped:
        log.warning("samsara_mp: shutdown could not ship every staged event (see the discarded count)")
    return shipped


@asynccontextmanager
async def lifespan(
    app: object = None, /, *, shutdown_timeout: float | None = None, **config: Any
) -> AsyncIterator[None]:
    """FastAPI/Starlette ``lifespan=``: the client from ``config`` while the app runs.

    ``FastAPI(lifespan=lifespan)`` takes every key from ``SAMSARA_MP_*``
    variables; ``functools.partial(lifespan, sourceId="api")`` gives keys;
    ``async with lifespan(app): ...`` composes it with your own lifespan.
    ``shutdown_timeout`` (seconds) bounds the shipping at shutdown.
    """
    client = start(**config)
    try:
        yield
    finally:
        await stop(client, shutdown_timeout)


class SamsaraLifespan:
    """``SamsaraLifespan(app, **config)``: ``app`` with the client's lifespan around it.

    When ``app`` runs the lifespan protocol itself (Starlette, FastAPI), the
    client is made as the server's startup message reaches the app and closed
    as the app reports its shutdown complete; when it does not (it returns or
    raises on the ``lifespan`` scope), this wrapper answers the protocol.
    """

    def __init__(self, app: ASGIApp, *, shutdown_timeout: float | None = None, **config: Any) -> None:
        self.app = app
        self.config = config
        self.shutdown_timeout = shutdown_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await _Lifespan(self, receive, send).run(scope)


class _Lifespan:
    """One run of the lifespan protocol, shared between the wrapper and the wrapped app."""

    def __init__(self, owner: SamsaraLifespan, receive: Receive, send: Send) -> None:
        self.owner = owner
        self.receive = receive
        self.send = send
        self.client: SamsaraClient | None = None
        self.got_startup = False
        self.start_error: Exception | None = None
        self.app_answered = False  # the app sent lifespan.startup.complete or .failed

    async def _app_receive(self) -> Message:
        message = await self.receive()
        if message["type"] == "lifespan.startup":
            self.got_startup = True
            try:
                self.client = start(**self.owner.config)
            except Exception as exc:
                self.start_error = exc
                raise  # into the app, which reports its startup as failed
        return message

    async def _app_send(self, message: Message) -> None:
        kind = message["type"]
        if kind.startswith("lifespan.startup."):
            self.app_answered = True
        elif kind.startswith("lifespan.shutdown.") and self.client is not None:
            client, self.client = self.client, None
            await stop(client, self.owner.shutdown_timeout)
        await self.send(message)

    async def run(self, scope: Scope) -> None:
        try:
            await self.owner.app(scope, self._app_receive, self._app_send)
        except Exception:
            if self.app_answered:
                raise
            log.debug("samsara_mp: the wrapped app does not run the lifespan protocol", exc_info=True)
        if not self.app_answered:
            await self._serve_alone()

    async def _serve_alone(self) -> None:
        """The app does not speak lifespan: answer startup and shutdown here."""
        if not self.got_startup:
            await self.receive()  # lifespan.startup
            try:
                self.client = start(**self.owner.config)
            except Exception as exc:  # noqa: BLE001 - reported to the server, which stops
                self.start_error = exc
        if self.start_error is not None:
            await self.send({"type": "lifespan.startup.failed", "message": str(self.start_error)})
            return
        await self.send({"type": "lifespan.startup.complete"})
        await self.receive()  # lifespan.shutdown
        client, self.client = self.client, None
        if client is not None:
            await stop(client, self.owner.shutdown_timeout)
        await self.send({"type": "lifespan.shutdown.complete"})
