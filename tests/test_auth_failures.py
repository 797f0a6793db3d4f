"""401, 403 and a proxy's 407 keep the events: retried with backoff, never rejected, logged at
ERROR at most once a minute, shown in stats and by ``samsara-mp status``'s exit code."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from conftest import wait_until

from samsara_mp import Publisher, PublishError, SamsaraClient
from samsara_mp.delivery import settle
from samsara_mp.ingest import IngestServer
from samsara_mp.transport import HTTPAnswer


class _Answers:
    """A transport that gives these statuses in turn, then 202."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)

    def post(self, payloads: Any, body: Any = None) -> HTTPAnswer:
        status = self.statuses.pop(0) if self.statuses else 202
        return HTTPAnswer(status, {}, b"<html>denied</html>", 10, 10)


@pytest.mark.parametrize("status", [401, 403, 407])
def test_settle_keeps_the_events_of_refused_credentials(status: int) -> None:
    out = settle(_Answers(status), [b'{"i":1}', b'{"i":2}'])  # type: ignore[arg-type]
    assert out.retry and out.auth_failure == status
    assert out.rejected == [] and out.delivered == [] and out.pending == 2
    assert f"HTTP {status}" in (out.error or "")


def _status_exit(runtime_dir: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "samsara_mp", "status", "--channel", "t", "--runtime-dir",
         runtime_dir, "--json"], capture_output=True, text=True, timeout=60)
    return proc.returncode


@pytest.mark.parametrize("status", [401, 403])
def test_a_credentials_rotation_delivers_everything(
    status: int, server: IngestServer, fast_config: dict[str, Any]
) -> None:
    server.inject(status=status, count=15)
    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="rot", start_publishing_thread=False, **fast_config) as client:
            for seq in range(2_000):
                client.record_event(eventName="rotated", seq=seq)
            assert client.flush(timeout=60)
        stats = wait_until(lambda: (s := pub.stats())["delivered"] == 2_000 and s, 30, "delivery")
        log = (pub.channel.dir / "publisher.log").read_text()
    assert stats["statuses"].get(str(status)) == 15
    assert stats["rejected"] == 0 and stats["recorded"] == stats["delivered"] == 2_000
    assert stats["auth_failing"] is False and stats["last_auth_failure_at"] is not None
    assert sorted(e["seq"] for e in server.events()) == list(range(2_000))
    # 15 refusals in a row, one ERROR line.
    errors = [line for line in log.splitlines() if f"answers HTTP {status}" in line]
    assert len(errors) == 1, errors


def test_status_fails_while_the_credentials_are_refused(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    server.inject(status=401, count=1_000_000)
    with Publisher(**fast_config) as pub:
        with SamsaraClient(sourceId="st", start_publishing_thread=False, **fast_config) as client:
            client.record_event(eventName="held")
            assert client.ship(30)
            wait_until(lambda: pub.stats()["auth_failing"], 30, "auth_failing")
            assert _status_exit(fast_config["runtime_dir"]) == 1
            server.clear_faults()
            stats = wait_until(lambda: (s := pub.stats())["delivered"] == 1 and s, 30, "delivery")
            assert stats["auth_failing"] is False and stats["rejected"] == 0
            assert _status_exit(fast_config["runtime_dir"]) == 0


def test_publish_events_raises_on_refused_credentials_and_rejects_nothing(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    server.inject(status=403, count=1)
    client = SamsaraClient(sourceId="pe", start_publishing_thread=False, **fast_config)
    try:
        with pytest.raises(PublishError) as info:
            client.publish_events([{"eventName": "e"}])
        assert info.value.status == 403 and "credentials" in str(info.value)
        assert client.publish_events([{"eventName": "e"}])
    finally:
        client.close(timeout=0.1)
