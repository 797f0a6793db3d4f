"""The rows of the README's "What each answer of the API does" that no other test covers: an odd
2xx, 404, a single event still too large for a 413, connection refused, a TLS failure."""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

import pytest
import trustme
from conftest import wait_until

from samsara_mp import Publisher, PublishError, SamsaraClient, delivery
from samsara_mp.ingest import IngestServer


@pytest.fixture
def once_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The odd-2xx warning is said once per process: let this test's be the first."""
    monkeypatch.setattr(delivery, "_warned_odd_2xx", False)


def _misrouted_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "answering in its place" in r.getMessage()]


@pytest.mark.parametrize(("status", "body", "said"), [
    (200, "<html><body>Welcome to the proxy</body></html>", "with an HTML page"),
    (204, None, "HTTP 204"),
])
def test_a_2xx_unlike_the_apis_is_delivered_and_logged_once(
    status: int, body: str | None, said: str, server: IngestServer, fast_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture, once_again: None,
) -> None:
    server.inject(status=status, count=2, body=body)
    client = SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config)
    try:
        with caplog.at_level(logging.WARNING, logger="samsara_mp"):
            assert client.publish_events([{"eventName": "a"}])
            assert client.publish_events([{"eventName": "b"}])
            assert client.publish_events([{"eventName": "c"}])  # the real API's 202
    finally:
        client.close(timeout=0.1)
    warnings = _misrouted_warnings(caplog)
    assert len(warnings) == 1 and said in warnings[0], warnings
    assert server.event_count() == 1  # what the impostor "delivered" never reached the API


def test_a_202_with_json_is_not_called_misrouted(
    server: IngestServer, fast_config: dict[str, Any], caplog: pytest.LogCaptureFixture,
    once_again: None,
) -> None:
    client = SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config)
    try:
        with caplog.at_level(logging.WARNING, logger="samsara_mp"):
            assert client.publish_events([{"eventName": "a"}])
    finally:
        client.close(timeout=0.1)
    assert _misrouted_warnings(caplog) == []


@pytest.mark.parametrize(("status", "count"), [(404, 1), (413, 1)])
def test_a_404_and_a_413_for_a_single_event_reject_it_counted(
    status: int, count: int, server: IngestServer, fast_config: dict[str, Any]
) -> None:
    server.inject(status=status, count=count)
    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config) as client:
            client.record_event(eventName="alone")
            client.flush(timeout=30)
            client.record_event(eventName="after")
            client.flush(timeout=30)
        stats = wait_until(lambda: (s := pub.stats())["delivered"] + s["rejected"] == 2 and s, 20,
                           "both settled")
    assert stats["rejected"] == 1 and stats["delivered"] == 1
    assert stats["statuses"].get(str(status)) == 1
    assert [e["eventName"] for e in server.events()] == ["after"]
    with SamsaraClient(sourceId="s", start_publishing_thread=False, **fast_config) as client:
        server.inject(status=status, count=1)
        with pytest.raises(PublishError) as info:
            client.publish_events([{"eventName": "refused"}])
        assert info.value.status == status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_keeps_the_events_until_the_api_listens(
    fast_config: dict[str, Any]
) -> None:
    port = _free_port()
    config = dict(fast_config, url=f"http://127.0.0.1:{port}")
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            for seq in range(50):
                client.record_event(eventName="waiting", seq=seq)
            assert client.ship(30)
            stats = wait_until(lambda: (s := pub.stats())["retries"] >= 2 and s, 20, "retries")
            assert "refused" in stats["last_error"].lower() or "connect" in stats["last_error"].lower()
            assert stats["rejected"] == 0 and stats["buffered"] == 50
            with IngestServer(store="memory", port=port) as api:
                assert client.flush(timeout=30)
                assert [e["seq"] for e in api.events()] == list(range(50))
        assert pub.stats()["delivered"] == 50


def test_a_tls_failure_keeps_the_events_and_retries(fast_config: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    ca = trustme.CA()  # trusted by no one
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    with IngestServer(store="memory", ssl_context=ctx) as api:
        config = dict(fast_config, url=api.url)
        with Publisher(**config) as pub:
            with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
                for seq in range(20):
                    client.record_event(eventName="untrusted", seq=seq)
                assert client.ship(30)
                stats = wait_until(lambda: (s := pub.stats())["retries"] >= 2 and s, 20, "retries")
        assert "SSL" in stats["last_error"] or "certificate" in stats["last_error"]
        assert stats["rejected"] == 0 and stats["delivered"] == 0 and stats["buffered"] == 20
        assert api.event_count() == 0
