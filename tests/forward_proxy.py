"""A small forward proxy on 127.0.0.1 for the tests: a CONNECT tunnel for HTTPS, absolute-URI
forwarding for HTTP (one request per connection), an optional Basic credential it requires."""

from __future__ import annotations

import base64
import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit


class _Handler(socketserver.BaseRequestHandler):
    server: _ProxyServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                return
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = [tuple(line.split(":", 1)) for line in lines[1:] if ":" in line]
        auth = next((v.strip() for k, v in headers if k.lower() == "proxy-authorization"), None)
        self.server.seen.append({"method": method, "target": target, "auth": auth})
        if self.server.expected_auth is not None and auth != self.server.expected_auth:
            sock.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
            self._relay(sock, upstream)
            return
        parts = urlsplit(target)
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return
            rest += chunk
        kept = [f"{k}:{v}" for k, v in headers
                if not k.lower().startswith("proxy-") and k.lower() != "connection"]
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""])
        upstream = socket.create_connection((parts.hostname, parts.port or 80), timeout=30)
        upstream.sendall(request.encode("latin-1") + rest)
        self._relay(sock, upstream)

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        """Copy both ways until either side closes or the proxy stops."""
        with self.server.lock:
            self.server.upstreams.add(b)
        try:
            while not self.server.stopping.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.2)
                for src in readable:
                    dst = b if src is a else a
                    data = src.recv(65536)
                    if not data:
                        return
                    dst.sendall(data)
        except OSError:
            return
        finally:
            with self.server.lock:
                self.server.upstreams.discard(b)
            b.close()


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    # Handler threads are joined at server_close(): stop() ends every one of them.
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, expected_auth: str | None) -> None:
        self.seen: list[dict[str, Any]] = []
        self.expected_auth = expected_auth
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.upstreams: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)


class ForwardProxy:
    """A running proxy: ``url`` (with credentials when it requires them), ``seen`` requests."""

    def __init__(self, server: _ProxyServer, user: str | None, password: str | None) -> None:
        self._server = server
        port = server.server_address[1]
        creds = f"{user}:{password}@" if user is not None else ""
        self.url = f"http://{creds}127.0.0.1:{port}"
        self.bare_url = f"http://127.0.0.1:{port}"

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self._server.seen


@contextmanager
def running(user: str | None = None, password: str | None = None) -> Iterator[ForwardProxy]:
    """Serve a proxy for the ``with`` block; it is stopped, its threads joined, on the way out."""
    expected = None
    if user is not None:
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    server = _ProxyServer(expected)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-forward-proxy", daemon=True)
    thread.start()
    try:
        yield ForwardProxy(server, user, password)
    finally:
        server.stopping.set()
        server.shutdown()
        thread.join(10)
        server.server_close()
