"""A tiny counting HTTP server for the Segment baseline of bench_throughput.py.

Segment's client posts ``{"batch": [...], "sentAt": ..., "writeKey": ...}`` to
``/v1/batch``, which the Samsara reference server does not speak (it would
answer 404). This stdlib server parses each body as fully as the reference
server does (gunzip if asked, JSON-decode), counts ``len(batch)``, answers
200 ``{}``, and reports the count on ``GET /stats``. Loopback only.

    python benchmarks/_segment_sink.py --ready-file F
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _State:
    lock = threading.Lock()
    events = 0
    requests = 0
    last_at: float | None = None  # time.time() of the last counted batch


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/batch":
            self._answer(404, b'{"code":"not_found","message":"Not found"}')
            return
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            body = gzip.decompress(body)
        batch = json.loads(body).get("batch", [])
        with _State.lock:
            _State.events += len(batch)
            _State.requests += 1
            _State.last_at = time.time()
        self._answer(200, b"{}")

    def do_GET(self) -> None:
        if self.path != "/stats":
            self._answer(404, b"{}")
            return
        with _State.lock:
            body = json.dumps(
                {"events": _State.events, "requests": _State.requests, "last_at": _State.last_at}
            ).encode()
        self._answer(200, body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    host, port = server.server_address[:2]
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({"url": f"http://{host}:{port}", "pid": os.getpid()}) + "\n")
    os.replace(tmp, args.ready_file)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
