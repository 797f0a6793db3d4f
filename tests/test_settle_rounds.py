"""Settling a batch takes as many 400 rounds as the API needs, without recursion."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from samsara_mp import PublishError, SamsaraClient


class _RejectFirst(BaseHTTPRequestHandler):
    """An API that finds exactly one bad event per request: the first of the batch."""

    rounds = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        events = json.loads(gzip.decompress(body))
        type(self).rounds += 1
        answer = json.dumps(["eventName: refused"] + ["OK"] * (len(events) - 1)).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def reject_first() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RejectFirst)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_one_bad_event_per_answer_settles_every_event_without_recursion(
    reject_first: str, runtime_dir: str
) -> None:
    client = SamsaraClient(url=reject_first, sourceId="s", runtime_dir=runtime_dir,
                           start_publishing_thread=False)
    try:
        with pytest.raises(PublishError) as info:
            client.publish_events([{"eventName": "e", "i": i} for i in range(1_200)])
        assert "1200 of 1200 events not accepted" in str(info.value)
        assert info.value.status == 400
        assert _RejectFirst.rounds == 1_200
    finally:
        client.close(timeout=0.1)
