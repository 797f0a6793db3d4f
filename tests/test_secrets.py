"""Secrets (URL credentials, ``headers``) never reach argv, logs, stats, status or errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from procs import alive

from samsara_mp import InvalidConfiguration, SamsaraClient
from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer

PASSWORD = "pw-S3CRET-7f1d"
TOKEN = "tok-S3CRET-91ab"


def _secret_url(server: IngestServer) -> str:
    return server.url.replace("http://", f"http://user:{PASSWORD}@")


def _no_secret(text: str, where: str) -> None:
    assert PASSWORD not in text, f"the URL's password shows in {where}"
    assert TOKEN not in text, f"a header's value shows in {where}"


def test_a_launched_publisher_has_no_secret_on_its_command_line_and_uses_them(
    server: IngestServer, runtime_dir: str
) -> None:
    client = SamsaraClient(
        url=_secret_url(server), sourceId="s", runtime_dir=runtime_dir, channel="sec",
        headers={"X-Api-Key": TOKEN}, publish_interval=50, min_buffer_size=1,
        send_client_stats=False,
    )
    channel = Channel(client.config)
    try:
        for i in range(10):
            client.record_event(eventName="e", n=i)
        assert client.flush(30)
        info = wait_until(channel.read_info, 10, "publisher.json")
        pid = int(info["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert "samsara_mp" in cmdline  # it is the publisher's
        _no_secret(cmdline, "/proc/<pid>/cmdline")
        _no_secret(json.dumps(info), "publisher.json")
        stats = client.stats()
        _no_secret(json.dumps(stats), "stats()")
        assert stats["channel"]["url"] == server.url.replace("http://", "http://***@")
        _no_secret(repr(client.config), "repr(Config)")
        status = subprocess.run(
            [sys.executable, "-m", "samsara_mp", "status", "--channel", "sec",
             "--runtime-dir", runtime_dir, "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert status.returncode == 0, status.stderr
        _no_secret(status.stdout + status.stderr, "samsara-mp status")
    finally:
        client.close()
    # Both secrets were used on the wire: basic auth from the URL, and the header.
    posts = [r for r in server.requests() if r["path"].endswith("/v1/events")]
    assert posts
    headers = {k.lower(): v for k, v in posts[0]["headers"].items()}
    assert headers["x-api-key"] == TOKEN
    assert headers["authorization"].startswith("Basic ")
    assert server.event_count() == 10
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), 20, f"publisher {pid} to stop")
    _no_secret((channel.dir / "publisher.log").read_text(), "publisher.log")


def test_a_failing_api_logs_no_secret(runtime_dir: str) -> None:
    # Nothing listens on this port: every POST fails, and the failure is logged.
    with IngestServer(store="memory") as srv:
        url = srv.url
    client = SamsaraClient(
        url=url.replace("http://", f"http://user:{PASSWORD}@"), sourceId="s",
        runtime_dir=runtime_dir, channel="down", headers={"Authorization": f"Bearer {TOKEN}"},
        publish_interval=50, min_buffer_size=1, backoff_base=10, backoff_cap=50,
        send_client_stats=False,
    )
    channel = Channel(client.config)
    try:
        client.record_event(eventName="e")
        assert client.ship(30)
        wait_until(lambda: (client.stats()["channel"] or {}).get("last_error"), 20, "a failed POST")
        stats = client.stats()
        _no_secret(json.dumps(stats), "stats() after failures")
    finally:
        client.close()
        info = channel.read_info()
        if info:
            os.kill(int(info["pid"]), signal.SIGTERM)
            wait_until(lambda: not alive(int(info["pid"])), 20, "publisher to stop")
    _no_secret((channel.dir / "publisher.log").read_text(), "publisher.log")


@pytest.mark.parametrize(
    "headers, fragment",
    [
        ({"Content-Type": "text/plain"}, "set by samsara_mp itself"),
        ({"X-Samsara-publishedTimestamp": "1"}, "set by samsara_mp itself"),
        ({"Bad Name": "x"}, "not a valid HTTP header name"),
        ({"X-Token": f"{TOKEN}\r\nX-Injected: 1"}, "line break"),
        ({"X-Token": 5}, "must be a string"),
        ({"Authorization": f" Bearer {TOKEN}"}, "begins or ends with a blank"),
        ({"Authorization": f"Bearer {TOKEN}\t"}, "begins or ends with a blank"),
        ({"X-Token": f"{TOKEN}\u2603"}, "outside Latin-1"),
        ({"X-Token": f"\xa0{TOKEN}"}, "begins or ends with a blank"),
        ({"X-Token": f"\x85{TOKEN}"}, "begins or ends with a blank"),
        ({"X-Token\n": TOKEN}, "not a valid HTTP header name"),
        ({"X-Token": f"{TOKEN}\x7f"}, "control character"),
        (["X-Token", TOKEN], "must be a mapping"),
    ],
)
def test_bad_headers_are_refused_naming_the_key_not_the_value(headers: Any, fragment: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(url="http://127.0.0.1:1", headers=headers)
    assert info.value.key == "headers"
    assert fragment in str(info.value)
    _no_secret(str(info.value), "the error")


def test_headers_come_from_the_environment_as_json() -> None:
    env = {"SAMSARA_MP_URL": "http://h", "SAMSARA_MP_HEADERS": json.dumps({"X-K": TOKEN})}
    config = Config.build(env=env)
    assert config.headers == {"X-K": TOKEN}
    _no_secret(repr(config), "repr(Config)")
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={"SAMSARA_MP_URL": "http://h", "SAMSARA_MP_HEADERS": TOKEN})
    assert info.value.key == "headers"
    _no_secret(str(info.value), "the error")


def test_an_invalid_url_error_hides_its_credentials() -> None:
    for url in (f"ftp://user:{PASSWORD}@host/", f"http://user:{PASSWORD}@host:notaport/"):
        with pytest.raises(InvalidConfiguration) as info:
            Config.build(url=url)
        assert info.value.key == "url"
        _no_secret(str(info.value), "the error")
