"""Transport: what each POST puts on the wire, now that requests prepares the request once."""

from __future__ import annotations

import base64
import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from samsara_mp.transport import PUBLISHED_TIMESTAMP_HEADER, Transport


class _Recorder(BaseHTTPRequestHandler):
    """Keeps each request's headers and body; its first answer sets a cookie, as a
    load balancer's sticky session does."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append({"headers": self.headers, "body": body, "path": self.path})
        self.send_response(200)
        if len(self.seen) == 1:
            self.send_header("Set-Cookie", "lb=node-7; Path=/")
        elif self.headers.get("X-Rotate"):
            self.send_header("Set-Cookie", f"lb=node-{len(self.seen)}; Path=/")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_each_post_has_its_own_body_length_and_timestamp_and_the_cookie_an_answer_set(
    recorder: tuple[str, list[dict[str, Any]]],
) -> None:
    base, seen = recorder
    transport = Transport(base + "/v1/events", 5.0, headers={"X-Team": "a"})
    try:
        batches = [[b'{"i":%d}' % i for i in range(n)] for n in (3, 300, 1)]
        for batch in batches:
            assert transport.post(batch).status == 200
    finally:
        transport.close()
    assert len(seen) == 3
    stamps = []
    for req, batch in zip(seen, batches, strict=True):
        headers = req["headers"]
        assert req["path"] == "/v1/events"
        assert int(headers["Content-Length"]) == len(req["body"])
        assert json.loads(gzip.decompress(req["body"])) == [json.loads(e) for e in batch]
        assert headers["Content-Encoding"] == "gzip" and headers["X-Team"] == "a"
        assert len(headers.get_all(PUBLISHED_TIMESTAMP_HEADER)) == 1
        stamps.append(int(headers[PUBLISHED_TIMESTAMP_HEADER]))
    assert stamps == sorted(stamps)
    assert "Cookie" not in seen[0]["headers"]
    assert [r["headers"]["Cookie"] for r in seen[1:]] == ["lb=node-7", "lb=node-7"]


def test_cookies_a_given_session_holds_are_sent_as_they_are_at_each_post(
    recorder: tuple[str, list[dict[str, Any]]],
) -> None:
    import requests

    base, seen = recorder
    session = requests.Session()
    session.cookies.set("lb", "node-0", domain="127.0.0.1", path="/")
    transport = Transport(base + "/v1/events", 5.0, session=session, headers={"X-Rotate": "1"})
    try:
        for i in range(4):
            assert transport.post([b'{"i":%d}' % i]).status == 200
    finally:
        transport.close()
    # The first answer replaces node-0 with node-7; later answers rotate it.
    assert [r["headers"]["Cookie"] for r in seen] == ["lb=node-0", "lb=node-7", "lb=node-2", "lb=node-3"]


def test_url_credentials_are_sent_as_basic_auth_on_every_post(
    recorder: tuple[str, list[dict[str, Any]]],
) -> None:
    base, seen = recorder
    transport = Transport(base.replace("http://", "http://ingest:s3cret@") + "/v1/events", 5.0,
                          compression="none")
    try:
        assert transport.post([b'{"i":1}']).status == 200
        assert transport.post([b'{"i":2}']).status == 200
    finally:
        transport.close()
    expected = "Basic " + base64.b64encode(b"ingest:s3cret").decode()
    assert [r["headers"]["Authorization"] for r in seen] == [expected, expected]
    assert [r["body"] for r in seen] == [b'[{"i":1}]', b'[{"i":2}]']
