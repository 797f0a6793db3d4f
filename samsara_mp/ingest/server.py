"""The reference Ingestion API server: two HTTP listeners and their lifecycle.

``IngestServer`` runs two ``ThreadingHTTPServer`` listeners on loopback: the API
(``POST {prefix}/v1/events``, ``GET {prefix}/v1/api-status``) and an admin
listener (``PUT /v1/api-status`` like the real admin port, plus ``/_test/*``
controls). Answers follow the Ingestion API's documented semantics; the admin side lets tests
inject failures (status codes, ``Retry-After``, latency, hung or reset
connections) into the publisher's path without faking the network.

Validation, faults, stored state and the request handlers live in the private
modules beside this one; their public names are re-exported here.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from samsara_mp.ingest._faults import FAULT_MODES, FaultRule
from samsara_mp.ingest._routes import _AdminHandler, _ApiHandler, _HandlerBase
from samsara_mp.ingest._state import STORES, RequestRecord, _Core
from samsara_mp.ingest._validation import (
    MISSING_HEADER_WARNING,
    NOT_A_LIST_ERROR,
    validate_events,
)

__all__ = [
    "FAULT_MODES",
    "MISSING_HEADER_WARNING",
    "NOT_A_LIST_ERROR",
    "STORES",
    "FaultRule",
    "IngestServer",
    "RequestRecord",
    "validate_events",
]


class _Listener(ThreadingHTTPServer):
    """A threading HTTP server that knows its connections so stop() can end them."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[_HandlerBase],
        core: _Core,
        prefix: str,
        max_body_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ssl_context = ssl_context
        self.core = core
        self.prefix = prefix
        self.max_body_bytes = max_body_bytes
        self.counts_connections = handler is _ApiHandler
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"samsara-ingest-conn-{self.server_address[1]}",
            daemon=True,
        )
        with self._conn_lock:
            self._conns[request] = thread
        if self.counts_connections:
            with self.core.lock:
                self.core.connections += 1
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        raw = request
        try:
            if self.ssl_context is not None:
                # The handshake runs in the connection's thread, not the accept loop, so a
                # client that never completes it holds up no one else.
                # Registered before the handshake, so that stop() can cut a stalled one.
                request = self.ssl_context.wrap_socket(
                    raw, server_side=True, do_handshake_on_connect=False)
                with self._conn_lock:
                    self._conns[request] = self._conns.pop(raw, threading.current_thread())
                try:
                    request.do_handshake()
                except (OSError, ValueError):
                    request.close()  # refused: no certificate, an untrusted one, or not TLS
                    return
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(request, None)
                self._conns.pop(raw, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.core.verbose:
            super().handle_error(request, client_address)

    def close_connections(self, deadline: float) -> None:
        """End idle keep-alive and in-flight connections, then join their threads."""
        with self._conn_lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip().rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return prefix


class IngestServer:
    """A real Ingestion API server on background daemon threads, for tests and local runs.

    ``store``: "memory" keeps accepted events, "file" appends them as JSON lines
    to ``out_path``, "both" does both, "count" only validates and counts.
    ``admin_port=None`` runs no admin listener. ``ssl_context`` (a server context)
    makes the API listener serve HTTPS. Not restartable once stopped.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_port: int | None = 0,
        out_path: str | None = None,
        store: str = "memory",
        prefix: str = "",
        *,
        verbose: bool = False,
        max_body_bytes: int = 64 * 1024 * 1024,
        max_request_log: int = 100_000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if store not in STORES:
            raise ValueError(f"store: must be one of {STORES}, got {store!r}")
        if store in ("file", "both") and not out_path:
            raise ValueError(f"out_path: required when store={store!r}")
        self.host = host
        self._port = port
        self._admin_port = admin_port
        self.prefix = _normalise_prefix(prefix)
        self._max_body_bytes = max_body_bytes
        # The API listener serves HTTPS with it (tests of CAs and client certificates);
        # the admin listener stays plain HTTP.
        self._ssl_context = ssl_context
        self._core = _Core(store, str(out_path) if out_path else None, max_request_log, verbose)
        self._lifecycle = threading.Lock()
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = False

    # lifecycle

    def start(self) -> Self:
        """Bind both listeners and serve in daemon threads; a second call does nothing."""
        with self._lifecycle:
            if self._stopped:
                raise RuntimeError("IngestServer cannot be restarted after stop()")
            if self._started:
                return self
            self._core.open()
            try:
                self._listeners.append(
                    _Listener(
                        (self.host, self._port),
                        _ApiHandler,
                        self._core,
                        self.prefix,
                        self._max_body_bytes,
                        self._ssl_context,
                    )
                )
                if self._admin_port is not None:
                    self._listeners.append(
                        _Listener(
                            (self.host, self._admin_port),
                            _AdminHandler,
                            self._core,
                            "",
                            1024 * 1024,
                        )
                    )
            except BaseException:
                for listener in self._listeners:
                    listener.server_close()
                self._listeners.clear()
                self._core.close()
                raise
            for listener in self._listeners:
                thread = threading.Thread(
                    target=listener.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name=f"samsara-ingest-{listener.server_address[1]}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
            self._started = True
            return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both listeners, release hung requests, close connections, join threads."""
        with self._lifecycle:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
            deadline = time.monotonic() + timeout
            self._core.stopping.set()
            for listener in self._listeners:
                listener.shutdown()
                listener.server_close()
            for listener in self._listeners:
                listener.close_connections(deadline)
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            self._core.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # addresses

    def _base(self, index: int) -> str:
        if len(self._listeners) <= index:
            raise RuntimeError("listener not started" if index == 0 else "no admin listener")
        host, port = self._listeners[index].server_address[:2]
        host = str(host)
        scheme = "https" if index == 0 and self._ssl_context is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self._listeners[0].server_address[1]) if self._listeners else self._port

    @property
    def admin_port(self) -> int | None:
        return (
            int(self._listeners[1].server_address[1])
            if len(self._listeners) > 1
            else self._admin_port
        )

    @property
    def url(self) -> str:
        """The base URL a client is configured with (prefix included)."""
        return self._base(0) + self.prefix

    @property
    def admin_url(self) -> str:
        return self._base(1)

    # observation

    def events(self, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Copies of the accepted events in arrival order ("memory"/"both" stores)."""
        with self._core.lock:
            end = None if limit is None else offset + limit
            return [dict(ev) for ev in self._core.events[offset:end]]

    def event_count(self) -> int:
        """Accepted events, in every store mode."""
        with self._core.lock:
            return self._core.accepted

    def requests(self) -> list[RequestRecord]:
        """Answered (or abandoned) API requests, oldest first."""
        with self._core.lock:
            return [rec.copy() for rec in self._core.records]

    def wait_for_events(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` events were accepted; False on timeout."""
        with self._core.changed:
            return self._core.changed.wait_for(lambda: self._core.accepted >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` API requests were received (answered or not)."""
        with self._core.changed:
            return self._core.changed.wait_for(lambda: self._core.received >= n, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters as ``GET /_test/stats`` reports them (``statuses`` keyed by str)."""
        return self._core.stats()

    # control

    def inject(
        self,
        status: int | None = 503,
        count: int = 1,
        retry_after: str | None = None,
        body: str | None = None,
        latency: float | None = None,
        mode: str | None = None,
        hang_seconds: float | None = None,
        location: str | None = None,
        trickle_interval: float | None = None,
    ) -> FaultRule:
        """Queue a fault for the next ``count`` event POSTs (FIFO after earlier rules)."""
        rule = FaultRule(status, count, retry_after, body, latency, mode, hang_seconds, location,
                         trickle_interval)
        self._core.add_faults([rule])
        return rule

    def pending_faults(self) -> list[tuple[FaultRule, int]]:
        with self._core.lock:
            return self._core.faults.pending()

    def clear_faults(self) -> int:
        """Drop every queued fault; returns how many rules were dropped."""
        return self._core.clear_faults()

    def set_online(self, online: bool) -> None:
        with self._core.lock:
            self._core.online = bool(online)

    def reset(self) -> None:
        """Forget events, requests, counters and faults; go online; truncate the out file."""
        self._core.reset()
