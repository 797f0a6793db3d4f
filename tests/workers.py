"""Worker-process bodies for the multi-process tests (importable under spawn)."""

from __future__ import annotations

from typing import Any

from samsara_mp import SamsaraClient


def record_many(config: dict[str, Any], worker: int, count: int) -> None:
    """Record ``count`` numbered events as source ``w{worker}``, then close (ships all)."""
    client = SamsaraClient(sourceId=f"w{worker}", **config)
    for seq in range(count):
        client.record_event(eventName="test.event", seq=seq, worker=worker)
    if not client.close(timeout=30):
        raise SystemExit(f"worker {worker} could not ship its staged events")


def record_with_inherited(client: SamsaraClient, worker: int, count: int) -> None:
    """Use a client created in the parent before fork."""
    for seq in range(count):
        client.record_event(eventName="test.event", sourceId=f"w{worker}", seq=seq, worker=worker)


def drop_secrets(event: dict[str, Any]) -> dict[str, Any] | None:
    """A before_send for the Pool test: removes ``password``, drops ``debug.*`` events."""
    if event["eventName"].startswith("debug."):
        return None
    event.pop("password", None)
    return event


def record_login(n: int) -> int:
    """A Pool task: one event with a password, one debug event, through get_client()."""
    from samsara_mp import get_client

    get_client().record_event(eventName="user.login", n=n, password=f"secret-{n}")
    get_client().record_event(eventName="debug.noise", n=n)
    return n
