"""The reference Ingestion API server: HTTP listeners, validation, storage, faults.

``IngestServer`` runs two ``ThreadingHTTPServer`` listeners on loopback: the API
(``POST {prefix}/v1/events``, ``GET {prefix}/v1/api-status``) and an admin
listener (``PUT /v1/api-status`` like the real admin port, plus ``/_test/*``
controls). Answers follow DESIGN.md "Semantics"; the admin side lets tests
inject failures (status codes, ``Retry-After``, latency, hung or reset
connections) into the publisher's path without faking the network.
"""

from __future__ import annotations

import collections
import gzip
import json
import json.encoder
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import IO, Any, Final, Self, TypedDict
from urllib.parse import parse_qs, urlsplit

STORES: Final = ("memory", "file", "both", "count")
FAULT_MODES: Final = ("hang", "reset")
MISSING_HEADER_WARNING: Final = (
    "For completeness, please provide the 'X-Samsara-publishedTimestamp' header."
)
NOT_A_LIST_ERROR: Final = "Invalid format, content-type must be application/json"

_JSON_CONTENT_TYPE: Final = re.compile(r"application/(.+\+)?json")
_LONG: Final = re.compile(r"[+-]?[0-9]{1,19}")
_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"


def _reject_constant(name: str) -> Any:
    # The real API parses with Jackson, which refuses NaN/Infinity literals.
    raise ValueError(f"invalid JSON literal {name}")


def _no_default(obj: object) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _make_line_encoder() -> Callable[[dict[str, Any]], str]:
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    # JSONEncoder.encode rebuilds the C encoder on every call; building it once
    # makes the file store's per-event encoding about 1.7x faster. No cycle check
    # (markers=None): these dicts come straight from json.loads.
    chunks = c_make_encoder(
        None, _no_default, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )

    def encode(event: dict[str, Any]) -> str:
        return "".join(chunks(event, 0))

    return encode


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_encode_line: Final = _make_line_encoder()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------- validation


def _event_error(event: object) -> str | None:
    if type(event) is not dict:
        return "event: must be a JSON object"
    errors: list[str] = []
    if "timestamp" not in event:
        errors.append("timestamp: missing")
    else:
        ts = event["timestamp"]
        if type(ts) is not int:
            errors.append("timestamp: must be an integer (epoch millis)")
        elif ts < 0:
            errors.append("timestamp: must be >= 0")
    for key in ("eventName", "sourceId"):
        if key not in event:
            errors.append(f"{key}: missing")
        elif type(event[key]) is not str or not event[key]:
            errors.append(f"{key}: must be a non-empty string")
    return "; ".join(errors) if errors else None


def validate_events(events: Sequence[object]) -> list[str] | None:
    """Return None when every event is valid, else the positional 400 answer.

    The answer has one entry per event: ``"OK"`` or a description such as
    ``"timestamp: missing"``. ``bool`` is not an integer timestamp.
    """
    # One cheap pass for the common all-valid batch; describe errors only on failure.
    for ev in events:
        if type(ev) is dict:
            ts = ev.get("timestamp")
            name = ev.get("eventName")
            src = ev.get("sourceId")
            if (
                type(ts) is int
                and ts >= 0
                and type(name) is str
                and name
                and type(src) is str
                and src
            ):
                continue
        break
    else:
        return None
    return [_event_error(ev) or "OK" for ev in events]


# -------------------------------------------------------------------- faults


@dataclass(frozen=True)
class FaultRule:
    """One queued fault, applied to the next ``count`` event POSTs.

    ``status=None`` answers normally (after ``latency``); ``mode="hang"``
    never answers until the server stops or ``hang_seconds`` pass, then closes
    the connection; ``mode="reset"`` closes it at once with a TCP reset.
    """

    status: int | None = 503
    count: int = 1
    retry_after: str | None = None
    body: str | None = None
    latency: float | None = None
    mode: str | None = None
    hang_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.status is not None and (
            type(self.status) is not int or not 100 <= self.status <= 599
        ):
            raise ValueError(
                f"status: must be an HTTP status 100..599 or null, got {self.status!r}"
            )
        if type(self.count) is not int or self.count < 1:
            raise ValueError(f"count: must be an integer >= 1, got {self.count!r}")
        if self.retry_after is not None and not isinstance(self.retry_after, str):
            raise ValueError("retry_after: must be a string (sent verbatim)")
        if self.body is not None and not isinstance(self.body, str):
            raise ValueError("body: must be a string")
        for key in ("latency", "hang_seconds"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise ValueError(f"{key}: must be a number of seconds >= 0")
        if self.mode is not None and self.mode not in FAULT_MODES:
            raise ValueError(f"mode: must be one of {FAULT_MODES} or null, got {self.mode!r}")

    @classmethod
    def from_json(cls, obj: object) -> FaultRule:
        """Build a rule from the admin API's JSON object; ValueError names the bad key."""
        if not isinstance(obj, dict):
            raise TypeError("a fault must be a JSON object")
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RequestRecord(TypedDict):
    """What the API listener saw of one request, and how it answered (0 = no answer)."""

    method: str
    path: str
    headers: dict[str, str]
    status: int
    n_events: int
    body_bytes: int


# --------------------------------------------------------------------- state


class _Core:
    """All state shared by the listeners' handler threads, behind one lock."""

    def __init__(
        self, store: str, out_path: str | None, max_request_log: int, verbose: bool
    ) -> None:
        self.store = store
        self.out_path = out_path
        self.verbose = verbose
        self.keep = store in ("memory", "both")
        self.write = store in ("file", "both")
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.out: IO[bytes] | None = None
        self.online = True
        self.faults: collections.deque[list[Any]] = collections.deque()
        self.records: collections.deque[RequestRecord] = collections.deque(maxlen=max_request_log)
        self.events: list[dict[str, Any]] = []
        self._zero()

    def _zero(self) -> None:
        self.accepted = 0
        self.received = 0
        self.event_posts = 0
        self.rejected_requests = 0
        self.rejected_events = 0
        self.bytes_in = 0
        self.faults_served = 0
        self.unanswered = 0
        self.connections = 0
        self.statuses: collections.Counter[int] = collections.Counter()

    def open(self) -> None:
        if self.write and self.out is None:
            assert self.out_path is not None
            # Held open for the server's life, closed by close(): not a with-block.
            self.out = open(self.out_path, "ab")  # noqa: SIM115

    def close(self) -> None:
        with self.lock:
            if self.out is not None:
                self.out.close()
                self.out = None

    def reset(self) -> None:
        with self.lock:
            self.events.clear()
            self.records.clear()
            self.faults.clear()
            self.online = True
            self._zero()
            if self.out is not None:
                self.out.seek(0)
                self.out.truncate()
            self.changed.notify_all()

    def note_received(self, event_post: bool) -> None:
        with self.lock:
            self.received += 1
            self.event_posts += event_post
            self.changed.notify_all()

    def add_faults(self, rules: Sequence[FaultRule]) -> int:
        with self.lock:
            self.faults.extend([rule, rule.count] for rule in rules)
            return len(self.faults)

    def clear_faults(self) -> int:
        with self.lock:
            n = len(self.faults)
            self.faults.clear()
            return n

    def take_fault(self) -> FaultRule | None:
        with self.lock:
            if not self.faults:
                return None
            head = self.faults[0]
            head[1] -= 1
            if head[1] <= 0:
                self.faults.popleft()
            self.faults_served += 1
            rule: FaultRule = head[0]
            return rule

    def accept(self, events: list[dict[str, Any]], published: int | None) -> None:
        lines = b""
        if self.keep or self.write:
            received_at = _now_ms()
            for ev in events:
                # The real API keeps values a client already set (it uses `or`).
                ev.setdefault("receivedAt", received_at)
                if published is not None:
                    ev.setdefault("publishedAt", published)
            if self.write and events:
                lines = ("\n".join(map(_encode_line, events)) + "\n").encode()
        with self.lock:
            if self.keep:
                self.events.extend(events)
            if self.out is not None and lines:
                self.out.write(lines)
                self.out.flush()
            self.accepted += len(events)
            self.changed.notify_all()

    def record(self, rec: RequestRecord, rejected_events: int) -> None:
        with self.lock:
            self.records.append(rec)
            self.bytes_in += rec["body_bytes"]
            if rec["status"]:
                self.statuses[rec["status"]] += 1
            else:
                self.unanswered += 1
            if rejected_events:
                self.rejected_requests += 1
                self.rejected_events += rejected_events

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.received,
                "event_posts": self.event_posts,
                "accepted_events": self.accepted,
                "rejected_requests": self.rejected_requests,
                "rejected_events": self.rejected_events,
                "bytes_in": self.bytes_in,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "unanswered": self.unanswered,
                "faults_served": self.faults_served,
                "pending_faults": sum(n for _, n in self.faults),
                "connections": self.connections,
                "online": self.online,
                "store": self.store,
            }


# ------------------------------------------------------------------- handler


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

    def _send(
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
        self._send(status, _dumps(obj), _JSON, headers)

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
                    self._send(500)
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
                self._send(400, f"Malformed gzip body: {exc}".encode(), _TEXT)
                return
        elif encoding != "identity":
            self._error(415, f"Unsupported Content-Encoding {encoding!r}")
            return
        try:
            events = _DECODER.decode(body.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            self._send(400, f"Malformed JSON in request body: {exc}".encode(), _TEXT)
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
            self._send(202)

    def _apply_fault(self, rule: FaultRule) -> bool:
        """Play one fault; False when the request should then be answered normally."""
        stopping = self.server.core.stopping
        if rule.latency:
            stopping.wait(rule.latency)
        if rule.mode == "hang":
            stopping.wait(rule.hang_seconds)
            self.close_connection = True
            return True
        if rule.mode == "reset":
            # SO_LINGER 0 makes close() send RST, as a crashed load balancer would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return True
        if rule.status is None:
            return False
        headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else None
        if rule.body is None:
            self._send_json(rule.status, {"status": "ERROR", "message": "Injected fault"}, headers)
        else:
            try:
                json.loads(rule.body)
                content_type = _JSON
            except ValueError:
                content_type = _TEXT
            self._send(rule.status, rule.body.encode(), content_type, headers)
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
            self._send(200)
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
                pending = [dict(rule.to_json(), remaining=n) for rule, n in core.faults]
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


# ------------------------------------------------------------------ listener


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
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
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
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(request, None)

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


# -------------------------------------------------------------------- server


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip().rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return prefix


class IngestServer:
    """A real Ingestion API server on background daemon threads, for tests and local runs.

    ``store``: "memory" keeps accepted events, "file" appends them as JSON lines
    to ``out_path``, "both" does both, "count" only validates and counts.
    ``admin_port=None`` runs no admin listener. Not restartable once stopped.
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
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

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
    ) -> FaultRule:
        """Queue a fault for the next ``count`` event POSTs (FIFO after earlier rules)."""
        rule = FaultRule(status, count, retry_after, body, latency, mode, hang_seconds)
        self._core.add_faults([rule])
        return rule

    def pending_faults(self) -> list[tuple[FaultRule, int]]:
        with self._core.lock:
            return [(rule, n) for rule, n in self._core.faults]

    def clear_faults(self) -> int:
        """Drop every queued fault; returns how many rules were dropped."""
        return self._core.clear_faults()

    def set_online(self, online: bool) -> None:
        with self._core.lock:
            self._core.online = bool(online)

    def reset(self) -> None:
        """Forget events, requests, counters and faults; go online; truncate the out file."""
        self._core.reset()
