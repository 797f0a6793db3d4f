"""HTTP to the Samsara Ingestion API: join, compress, POST, classify the answer.

One ``requests.Session`` per transport, so the publisher reuses its
connection. Events arrive already encoded; the body is their bytes joined into
one JSON array.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .helpers import current_time_millis

if TYPE_CHECKING:
    import requests

    from .config import Config

__all__ = ["Transport", "Body", "HTTPAnswer", "TransportError", "PUBLISHED_TIMESTAMP_HEADER"]

log = logging.getLogger("samsara_mp")

PUBLISHED_TIMESTAMP_HEADER = "X-Samsara-publishedTimestamp"


@dataclass
class HTTPAnswer:
    """What the API said to one POST."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw_bytes: int
    sent_bytes: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status <= 299

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    def text(self, limit: int = 500) -> str:
        return self.body[:limit].decode("utf-8", "replace")


@dataclass
class TransportError(Exception):
    """The POST got no HTTP answer (refused, reset, timed out)."""

    message: str
    raw_bytes: int = 0
    cause: BaseException | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Body:
    """A batch encoded for the wire: its JSON array's size, and what is sent."""

    raw_bytes: int
    data: bytes


def join_events(payloads: Sequence[bytes]) -> bytes:
    """The JSON array of already-encoded events."""
    return b"[" + b",".join(payloads) + b"]"


def gzip_bytes(data: bytes, level: int) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


class Transport:
    """POSTs batches to ``{url}/v1/events`` with the headers the API expects."""

    def __init__(
        self,
        endpoint: str,
        timeout_s: float,
        compression: str = "gzip",
        compression_level: int = 1,
        session: requests.Session | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = (timeout_s, timeout_s)
        self.gzip = compression == "gzip"
        self.level = compression_level
        import requests  # here, not at import: the publisher serves before it loads requests

        self.session = session or requests.Session()
        self.session.trust_env = False  # never route loopback or the API through a proxy env
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Content-Encoding": "gzip" if self.gzip else "identity",
            **(headers or {}),
        }

    @classmethod
    def from_config(cls, cfg: Config) -> Transport:
        """The transport a configuration describes (endpoint, timeout, compression, headers)."""
        return cls(cfg.endpoint, cfg.send_timeout_s, cfg.compression, cfg.compression_level,
                   headers=cfg.headers)

    def encode(self, payloads: Sequence[bytes]) -> Body:
        """Join a batch into one JSON array and compress it as configured."""
        raw = join_events(payloads)
        return Body(len(raw), gzip_bytes(raw, self.level) if self.gzip else raw)

    def post(self, payloads: Sequence[bytes], body: Body | None = None) -> HTTPAnswer:
        """Send one batch (``body``: that batch already encoded); return the answer,
        or raise ``TransportError``."""
        if body is None:
            body = self.encode(payloads)
        headers = dict(self._headers)
        headers[PUBLISHED_TIMESTAMP_HEADER] = str(current_time_millis())
        try:
            # Never follow a redirect: requests would turn the POST into a GET,
            # and its 200 would count events as delivered that the API never took.
            resp = self.session.post(self.endpoint, data=body.data, headers=headers, timeout=self.timeout,
                                     allow_redirects=False)
            content = resp.content
        except _request_exception() as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}", body.raw_bytes, exc) from exc
        return HTTPAnswer(resp.status_code, dict(resp.headers), content, body.raw_bytes, len(body.data))

    def close(self) -> None:
        self.session.close()


def _request_exception() -> type[Exception]:
    import requests

    return requests.RequestException
