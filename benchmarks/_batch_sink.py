"""A tiny counting HTTP server for the Segment and PostHog baselines.

Segment's client posts ``{"batch": [...], "sentAt": ..., "writeKey": ...}`` to
``/v1/batch``; PostHog's (capture v0, its default) posts ``{"api_key": ...,
"batch": [...], "sent_at": ...}`` to ``/batch/``. The Samsara reference
server speaks neither (it would answer 404). This stdlib server parses each
body as fully as the reference server does (gunzip if asked, JSON-decode),
counts ``len(batch)``, answers 200 ``{"status": 1}``, and reports the count on
``GET /stats`` (with the requests per path: any other path, such as a
feature-flag call, is answered 404 and counted there).

With ``--keys`` it also keeps, in arrival order, each event's
``properties["wk"]`` and ``properties["seq"]`` (a worker index and a
sequence number), served on ``GET /keys`` as ``{"wk": [...], "seq": [...]}``,
so a benchmark can check duplicates and per-worker order. Loopback only.

    python benchmarks/_batch_sink.py --ready-file F [--keys]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BATCH_PATHS = ("/v1/batch", "/batch/", "/batch")  # Segment; PostHog v0 (with and without the slash)


class _State:
    lock = threading.Lock()
    events = 0
    requests = 0
    paths: Counter[str] = Counter()
    last_at: float | None = None  # time.time() of the last counted batch
    keep_keys = False
    wk: list[int] = []
    seq: list[int] = []


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
        path = self.path.split("?", 1)[0]
        if path not in BATCH_PATHS:
            with _State.lock:
                _State.paths["POST " + path] += 1
            self._answer(404, b'{"code":"not_found","message":"Not found"}')
            return
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            body = gzip.decompress(body)
        batch = json.loads(body).get("batch", [])
        wk: list[int] = []
        seq: list[int] = []
        if _State.keep_keys:
            for event in batch:
                props = event.get("properties") or {}
                wk.append(int(props.get("wk", -1)))
                seq.append(int(props.get("seq", -1)))
        with _State.lock:
            _State.events += len(batch)
            _State.requests += 1
            _State.paths["POST " + path] += 1
            _State.last_at = time.time()
            _State.wk.extend(wk)
            _State.seq.extend(seq)
        self._answer(200, b'{"status":1}')

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        with _State.lock:
            if path == "/stats":
                body = json.dumps({"events": _State.events, "requests": _State.requests,
                                   "last_at": _State.last_at, "paths": dict(_State.paths)}).encode()
            elif path == "/keys":
                body = json.dumps({"wk": _State.wk, "seq": _State.seq}).encode()
            else:
                _State.paths["GET " + path] += 1
                body = b""
        if not body:
            self._answer(404, b"{}")
            return
        self._answer(200, body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--keys", action="store_true", help="keep each event's properties wk and seq")
    args = parser.parse_args()
    _State.keep_keys = args.keys
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
