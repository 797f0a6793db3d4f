"""HTTP to the Samsara Ingestion API: join, compress, POST, classify the answer.

One ``requests.Session`` per transport, so the publisher reuses its
connection. Events arrive already encoded; the body is their bytes joined into
one JSON array.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .helpers import current_time_millis

if TYPE_CHECKING:
    import requests

    from .config import Config

__all__ = ["Transport", "Body", "HTTPAnswer", "TransportError", "PUBLISHED_TIMESTAMP_HEADER"]

log = logging.getLogger("samsara_mp")

PUBLISHED_TIMESTAMP_HEADER = "X-Samsara-publishedTimestamp"


class HTTPAnswer:
    """What the API said to one POST."""

    __slots__ = ("status", "headers", "body", "raw_bytes", "sent_bytes")

    def __init__(
        self, status: int, headers: dict[str, str], body: bytes, raw_bytes: int, sent_bytes: int
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_bytes = raw_bytes
        self.sent_bytes = sent_bytes

    def __repr__(self) -> str:
        return f"HTTPAnswer(status={self.status}, body={self.text(80)!r})"

    @property
    def ok(self) -> bool:
        return 200 <= self.status <= 299

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    def text(self, limit: int = 500) -> str:
        return self.body[:limit].decode("utf-8", "replace")


class TransportError(Exception):
    """The POST got no HTTP answer (refused, reset, timed out)."""

    def __init__(self, message: str, raw_bytes: int = 0, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.raw_bytes = raw_bytes
        self.cause = cause

    def __str__(self) -> str:
        return self.message


class Body:
    """A batch encoded for the wire: its JSON array's size, and what is sent."""

    __slots__ = ("raw_bytes", "data")

    def __init__(self, raw_bytes: int, data: bytes) -> None:
        self.raw_bytes = raw_bytes
        self.data = data


def join_events(payloads: Sequence[bytes]) -> bytes:
    """The JSON array of already-encoded events, built in one allocation.

    ``b"[" + b",".join(p) + b"]"`` makes three batch-sized objects; each above
    malloc's mmap threshold is fresh memory, so the page faults of the copies
    cost ~7x the join itself (0.8 ms against 0.12 ms for 5,000 events of
    145 B, benchmarks/README.md "CPU per event")."""
    if not payloads:
        return b"[]"
    parts = list(payloads)
    if len(parts) == 1:
        return b"[" + parts[0] + b"]"
    parts[0] = b"[" + parts[0]
    parts[-1] += b"]"
    return b",".join(parts)


@functools.cache
def _isal_zlib() -> Any:
    """ISA-L's deflate (python-isal, the optional "fast" extra), or None; imported
    at the first batch, not before a new publisher serves."""
    try:
        from isal import isal_zlib  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return isal_zlib


def gzip_level1() -> str:
    """Which compressor makes level 1, the default: ISA-L's level 1 is about 10x
    faster than zlib's on event batches, and its output smaller (benchmarks/README.md,
    "Compression"); other levels are zlib's, as configured."""
    return "zlib" if _isal_zlib() is None else "isal"


def gzip_bytes(data: bytes, level: int) -> bytes:
    """``data`` as one gzip member, compressed at ``level`` (1-9)."""
    lib: Any = (_isal_zlib() if level == 1 else None) or zlib
    comp = lib.compressobj(level, lib.DEFLATED, 31)
    packed: bytes = comp.compress(data) + comp.flush()
    return packed


class Transport:
    """POSTs batches to ``{url}/v1/events`` with the headers the API expects.

    A ``session`` given is read for its headers, auth and hooks once, here (the
    request is prepared once); its cookies are read at each POST."""

    def __init__(
        self,
        endpoint: str,
        timeout_s: float,
        compression: str = "gzip",
        compression_level: int = 1,
        session: requests.Session | None = None,
        headers: Mapping[str, str] | None = None,
        proxy: str | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = (timeout_s, timeout_s)
        self.gzip = compression == "gzip"
        self.level = compression_level
        import requests  # here, not at import: the publisher serves before it loads requests

        self.session = session or requests.Session()
        # The environment was read where the config was built (config.proxy, ca_bundle):
        # the publisher's own must not add to it, or differ from the client's.
        self.session.trust_env = False
        self._send_options: dict[str, Any] = {
            "proxies": {"http": proxy, "https": proxy} if proxy else {},
            "verify": verify,
            "cert": cert,
        }
        # Secrets an error message of urllib3 may quote (a proxy URL with its credentials).
        self._secrets = _url_secrets(endpoint) | (_url_secrets(proxy) if proxy else set())
        for adapter in self.session.adapters.values():
            managers = [getattr(adapter, "poolmanager", None)]
            if proxy and proxy.startswith(("http://", "https://")) and hasattr(adapter, "proxy_manager_for"):
                managers.append(adapter.proxy_manager_for(proxy))  # made once, cached by the adapter
            for manager in managers:
                if manager is not None:
                    manager.pool_classes_by_scheme = _watched_pool_classes()
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Content-Encoding": "gzip" if self.gzip else "identity",
            **(headers or {}),
        }
        # Prepared once: requests' per-call preparation (merging the session's
        # settings, parsing the url, building the headers) was a third of a POST's
        # CPU (benchmarks/README.md, "CPU per event"). Each POST copies it.
        self._template = self.session.prepare_request(
            requests.Request("POST", endpoint, headers=self._headers))
        if not any(k.lower() == "cookie" for k in self._headers):
            # The session's cookies are added per POST, as they are then (an
            # answer may have changed them); none are frozen into the template.
            self._template.headers.pop("Cookie", None)

    @classmethod
    def from_config(cls, cfg: Config) -> Transport:
        """The transport a configuration describes (endpoint, timeout, compression, headers,
        proxy and TLS)."""
        verify: bool | str = cfg.ca_bundle if cfg.verify and cfg.ca_bundle else cfg.verify
        cert = (cfg.client_cert, cfg.client_key) if cfg.client_cert and cfg.client_key else cfg.client_cert
        return cls(cfg.endpoint, cfg.send_timeout_s, cfg.compression, cfg.compression_level,
                   headers=cfg.headers, proxy=cfg.proxy, verify=verify, cert=cert)

    def encode(self, payloads: Sequence[bytes]) -> Body:
        """Join a batch into one JSON array and compress it as configured."""
        raw = join_events(payloads)
        return Body(len(raw), gzip_bytes(raw, self.level) if self.gzip else raw)

    def post(self, payloads: Sequence[bytes], body: Body | None = None) -> HTTPAnswer:
        """Send one batch (``body``: that batch already encoded); return the answer,
        or raise ``TransportError``."""
        if body is None:
            body = self.encode(payloads)
        prep = self._template.copy()
        prep.headers[PUBLISHED_TIMESTAMP_HEADER] = str(current_time_millis())
        prep.headers["Content-Length"] = str(len(body.data))
        prep.body = body.data
        cookies = self.session.cookies
        if cookies:  # set by an answer since (a load balancer's): sent as requests would
            prep.prepare_cookies(cookies)
        # requests bounds each socket operation, not the request: an API trickling its
        # answer a byte at a time would hold the POST for ever. The deadline cuts it.
        deadline = _Deadline(self.timeout[1])
        try:
            # Never follow a redirect: requests would turn the POST into a GET,
            # and its 200 would count events as delivered that the API never took.
            resp = self.session.send(prep, timeout=self.timeout, allow_redirects=False,
                                     **self._send_options)
            content = resp.content
        except _request_exception() as exc:
            if deadline.cut:
                raise TransportError(
                    f"no complete answer within send_timeout ({self.timeout[1]:g}s)", body.raw_bytes, exc
                ) from exc
            raise TransportError(self._scrub(f"{type(exc).__name__}: {exc}"), body.raw_bytes, exc) from None
        finally:
            deadline.cancel()
        if deadline.cut:  # cut just as the answer completed: the connection is closed, the answer whole
            log.debug("samsara_mp: a POST's deadline passed as its answer arrived")
        return HTTPAnswer(resp.status_code, dict(resp.headers), content, body.raw_bytes, len(body.data))

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def close(self) -> None:
        self.session.close()


def _url_secrets(url: str) -> set[str]:
    """A URL's password, as written and decoded, and its whole user part: what must
    never reach a log, stats or an error."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return set()
    userinfo = parts.netloc.rpartition("@")[0]
    found = {userinfo, unquote(userinfo)}
    if parts.password:
        found |= {parts.password, unquote(parts.password)}
    return {s for s in found if s}


# The urllib3 connection each thread's POST is using, so that its deadline can cut it.
_in_use: dict[int, Any] = {}
_in_use_lock = threading.Lock()


class _Deadline:
    """Shuts the calling thread's HTTP connection down when ``seconds`` pass, which
    makes the blocked read fail at once (a connect is bounded by its own timeout)."""

    def __init__(self, seconds: float) -> None:
        self.ident = threading.get_ident()
        self.cut = False
        self._done = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.name = "samsara-mp-deadline"
        self._timer.start()

    def _fire(self) -> None:
        with _in_use_lock:
            if self._done:
                return
            self.cut = True
            conn = _in_use.get(self.ident)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        with _in_use_lock:
            self._done = True
            _in_use.pop(self.ident, None)
        self._timer.cancel()


@functools.cache
def _watched_pool_classes() -> dict[str, type]:
    """urllib3 pools whose connections note, per thread, which one a request uses."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Watched:
        def request(self, *args: Any, **kwargs: Any) -> None:
            with _in_use_lock:
                _in_use[threading.get_ident()] = self
            super().request(*args, **kwargs)  # type: ignore[misc]

    class WatchedHTTPConnection(Watched, HTTPConnection):
        pass

    class WatchedHTTPSConnection(Watched, HTTPSConnection):
        pass

    class WatchedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    return {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}


def _request_exception() -> type[Exception]:
    import requests

    return requests.RequestException
