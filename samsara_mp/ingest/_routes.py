"""HTTP request handlers for the reference server's two listeners.

``_ApiHandler`` is the Ingestion API as the publisher sees it: ``POST
{prefix}/v1/events`` (202 / positional 400 / 415 / 503, or an injected fault)
and ``GET {prefix}/v1/api-status``. ``_AdminHandler`` is the admin port:
``PUT /v1/api-status`` like the real one, plus the ``/_test/*`` controls.
Answers follow the Ingestion API's documented semantics.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import struct
import zlib
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

from samsara_mp.ingest._faults import FaultRule
from samsara_mp.ingest._state import RequestRecord
from samsara_mp.ingest._validation import (
    MISSING_HEADER_WARNING,
    NOT_A_LIST_ERROR,
    decode_body,
    validate_events,
)

if TYPE_CHECKING:
    from samsara_mp.ingest.server import _Listener

_JSON_CONTENT_TYPE: Final = re.compile(r"application/(.+\+)?json")
_LONG: Final = re.compile(r"[+-]?[0-9]{1,19}")
_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _HandlerBase(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Small answers must not wait for a delayed ACK: no Nagle, and one write per answer.
    disable_nagle_algorithm = True
    wbufsize = -1
    server: _Listener

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.core.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        raise NotImplementedError

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = _JSON,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)
        self._status = status

    def _send_json(
        self, status: int, obj: object, headers: Mapping[str, str] | None = None
    ) -> None:
        self._reply(status, _dumps(obj), _JSON, headers)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"status": "ERROR", "message": message})

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering (and closing) when it cannot be read."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            self._error(400, "invalid Content-Length")
            return None
        if n > self.server.max_body_bytes:
            self.close_connection = True
            self._error(413, f"body larger than {self.server.max_body_bytes} bytes")
            return None
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            return None
        return data

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                self._error(400, "malformed chunked body")
                return None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > self.server.max_body_bytes:
                self.close_connection = True
                self._error(413, f"body larger than {self.server.max_body_bytes} bytes")
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)


class _ApiHandler(_HandlerBase):
    """The Ingestion API as clients see it."""

    def _dispatch(self) -> None:
        core = self.server.core
        self._status = 0
        self._n_events = 0
        self._rejected = 0
        path = urlsplit(self.path).path
        prefix = self.server.prefix
        is_post = self.command == "POST" and path == prefix + "/v1/events"
        core.note_received(is_post)
        body = self._read_body()
        try:
            if body is None:
                pass
            elif is_post:
                self._post_events(body)
            elif self.command == "GET" and path == prefix + "/v1/api-status":
                self._api_status()
            else:
                self._error(404, "Not found")
        except Exception as exc:  # noqa: BLE001 - the real API's catch-all answers 500
            if core.verbose:
                self.log_error("handler failed: %r", exc)
            self.close_connection = True
            if not self._status:
                try:
                    self._reply(500)
                except OSError:
                    pass
        finally:
            core.record(
                RequestRecord(
                    method=self.command,
                    path=self.path,
                    headers=dict(self.headers.items()),
                    status=self._status,
                    n_events=self._n_events,
                    body_bytes=len(body) if body is not None else 0,
                ),
                self._rejected,
            )

    def _api_status(self) -> None:
        online = self.server.core.online
        self._send_json(200 if online else 503, {"status": "online" if online else "offline"})

    def _post_events(self, body: bytes) -> None:
        core = self.server.core
        rule = core.take_fault()
        if rule is not None and self._apply_fault(rule):
            return
        if not core.online:
            self._error(503, "Service offline")
            return
        content_type = self.headers.get("Content-Type")
        if content_type is None or not _JSON_CONTENT_TYPE.fullmatch(content_type):
            self._error(
                415, f"Content-Type must match ^application/(.+\\+)?json$, got {content_type!r}"
            )
            return
        published_raw = self.headers.get("X-Samsara-publishedTimestamp")
        published: int | None = None
        if published_raw is not None:
            if not _LONG.fullmatch(published_raw):
                self._error(
                    400, f"X-Samsara-publishedTimestamp must be epoch millis, got {published_raw!r}"
                )
                return
            published = int(published_raw)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error) as exc:
                self._reply(400, f"Malformed gzip body: {exc}".encode(), _TEXT)
                return
        elif encoding != "identity":
            self._error(415, f"Unsupported Content-Encoding {encoding!r}")
            return
        try:
            events = decode_body(body)
        except (ValueError, RecursionError) as exc:
            self._reply(400, f"Malformed JSON in request body: {exc}".encode(), _TEXT)
            return
        if type(events) is not list:
            self._rejected = 1
            self._send_json(400, [NOT_A_LIST_ERROR])
            return
        self._n_events = len(events)
        answer = validate_events(events)
        if answer is not None:
            self._rejected = sum(1 for a in answer if a != "OK")
            self._send_json(400, answer)
            return
        core.accept(events, published)
        if published is None:
            self._send_json(202, {"status": "OK", "warning": MISSING_HEADER_WARNING})
        else:
            self._reply(202)

    def _apply_fault(self, rule: FaultRule) -> bool:
        """Play one fault; False when the request should then be answered normally."""
        stopping = self.server.core.stopping
        if rule.latency:
            stopping.wait(rule.latency)
        if rule.mode == "hang":
            stopping.wait(rule.hang_seconds)
            self.close_connection = True
            return True
        if rule.mode == "trickle":
            payload = json.dumps({"status": "ERROR", "message": "Injected fault"}).encode()
            status = rule.status or 503
            answer = (f"HTTP/1.1 {status} Trickled\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
            interval = 0.5 if rule.trickle_interval is None else rule.trickle_interval
            try:
                for i in range(len(answer)):
                    self.wfile.write(answer[i:i + 1])
                    self.wfile.flush()
                    if stopping.wait(interval):
                        break
            except OSError:
                pass  # the client gave up on it
            self.close_connection = True
            return True
        if rule.mode == "reset":
            # SO_LINGER 0 makes close() send RST, as a crashed load balancer would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return True
        if rule.status is None:
            return False
        headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else {}
        if rule.location is not None:
            headers["Location"] = rule.location
        if rule.body is None:
            self._send_json(rule.status, {"status": "ERROR", "message": "Injected fault"}, headers)
        else:
            try:
                json.loads(rule.body)
                content_type = _JSON
            except ValueError:
                content_type = _TEXT
            self._reply(rule.status, rule.body.encode(), content_type, headers)
        return True


class _AdminHandler(_HandlerBase):
    """The admin port: api-status switch and test controls."""

    def _dispatch(self) -> None:
        self._status = 0
        body = self._read_body()
        if body is None:
            return
        core = self.server.core
        split = urlsplit(self.path)
        route = (self.command, split.path)
        try:
            payload = json.loads(body) if body else None
        except ValueError as exc:
            self._error(400, f"Malformed JSON: {exc}")
            return
        if route == ("PUT", "/v1/api-status"):
            status = payload.get("status") if isinstance(payload, dict) else None
            if status not in ("online", "offline"):
                self._error(400, 'body must be {"status": "online"|"offline"}')
                return
            with core.lock:
                core.online = status == "online"
            self._reply(200)
        elif route == ("GET", "/v1/api-status"):
            self._send_json(200, {"status": "online" if core.online else "offline"})
        elif route == ("POST", "/_test/faults"):
            try:
                items = payload if isinstance(payload, list) else [payload]
                rules = [FaultRule.from_json(item) for item in items]
            except (TypeError, ValueError) as exc:
                self._error(400, str(exc))
                return
            self._send_json(200, {"status": "OK", "queued_rules": core.add_faults(rules)})
        elif route == ("GET", "/_test/faults"):
            with core.lock:
                pending = [dict(rule.to_json(), remaining=n) for rule, n in core.faults.pending()]
            self._send_json(200, pending)
        elif route == ("DELETE", "/_test/faults"):
            self._send_json(200, {"status": "OK", "cleared_rules": core.clear_faults()})
        elif route == ("GET", "/_test/stats"):
            self._send_json(200, core.stats())
        elif route == ("GET", "/_test/events"):
            query = parse_qs(split.query)
            try:
                offset = int(query.get("offset", ["0"])[0])
                limit_raw = query.get("limit", [None])[0]
                limit = int(limit_raw) if limit_raw is not None else None
            except ValueError:
                self._error(400, "offset and limit must be integers")
                return
            with core.lock:
                chosen = core.events[offset : None if limit is None else offset + limit]
            self._send_json(200, chosen)
        elif route == ("POST", "/_test/reset"):
            core.reset()
            self._send_json(200, {"status": "OK"})
        else:
            self._error(404, "Not found")
