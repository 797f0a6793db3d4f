"""A redirecting API is never a delivery: the POST does not follow it, and the events are kept."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import wait_until

from samsara_mp import Publisher, PublishError, SamsaraClient
from samsara_mp._redact import redact_url
from samsara_mp.ingest import IngestServer


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_attempt_and_the_events_are_delivered_later(
    status: int, server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # The Location answers 200 to a GET: a client that followed it would count a delivery.
    target = server.url.rstrip("/") + "/v1/api-status"
    server.inject(status=status, count=3, location=target)
    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="r", start_publishing_thread=False, **fast_config) as client:
            for seq in range(100):
                client.record_event(eventName="redirected", seq=seq)
            assert client.flush(timeout=30)
        stats = wait_until(lambda: (s := pub.stats())["delivered"] == 100 and s, 20, "delivery")
    assert stats["statuses"].get(str(status)) == 3
    assert stats["retries"] >= 3 and stats["rejected"] == 0
    assert stats["recorded"] == stats["delivered"] == 100
    assert [e["seq"] for e in server.events()] == list(range(100))


def test_publish_events_raises_on_a_redirect(server: IngestServer, fast_config: dict[str, Any]) -> None:
    server.inject(status=301, count=1, location=server.url.rstrip("/") + "/v1/api-status")
    client = SamsaraClient(sourceId="r", start_publishing_thread=False, **fast_config)
    try:
        with pytest.raises(PublishError) as info:
            client.publish_events([{"eventName": "e"}])
        assert info.value.status == 301
        assert server.event_count() == 0
    finally:
        client.close(timeout=0.1)


def test_url_credentials_are_redacted_for_display() -> None:
    assert redact_url("https://user:s3cret@api.example:8443/base") == "https://***@api.example:8443/base"
    assert redact_url("http://127.0.0.1:80/") == "http://127.0.0.1:80/"
