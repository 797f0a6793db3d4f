"""Hardening: hooks, directories given in the config, failed starts, and hostile events."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from samsara_mp import ChannelError, InvalidConfiguration, InvalidEvent, Publisher, SamsaraClient
from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.event import MAX_TIMESTAMP, EventEncoder
from samsara_mp.ingest import IngestServer


def _raising_hook(count: int, response: Any) -> None:
    raise RuntimeError("the user's hook is broken")


# ---- hooks (#11.7) ----
@pytest.mark.parametrize("path", ["no_such_module_xyz:hook", "json:no_such_function", "json:__doc__"])
def test_a_bad_hook_path_is_refused_when_the_config_is_built(path: str, runtime_dir: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        SamsaraClient(url="http://127.0.0.1:1", runtime_dir=runtime_dir, on_success=path)
    assert info.value.key == "on_success"
    # Nothing was launched for a config that cannot work.
    assert not list(Path(runtime_dir).glob("*/publisher.log"))


def test_a_raising_hook_is_counted_and_publishing_goes_on(
    server: IngestServer, fast_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH",
                       os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = dict(fast_config, on_success="test_hardening:_raising_hook")
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            for batch in range(3):
                for i in range(10):
                    client.record_event(eventName="e", n=batch * 10 + i)
                assert client.flush(30)
        stats = pub.stats()
    assert server.event_count() == 30
    assert stats["hook_errors"] >= 1 and stats["loop_alive"] is True
    log = (Channel(Config.build(**config)).dir / "publisher.log").read_text()
    assert log.count("RuntimeError: the user's hook is broken") == 1  # one traceback, not one per batch


def test_a_publisher_that_cannot_start_reports_its_cause(runtime_dir: str, server: IngestServer) -> None:
    # A spool directory open to others is refused by the publisher at start.
    spool = Path(runtime_dir) / "shared-spool"
    spool.mkdir(mode=0o777)
    os.chmod(spool, 0o777)
    config = dict(url=server.url, runtime_dir=runtime_dir, channel="cause", spool_dir=str(spool),
                  send_client_stats=False)
    with pytest.raises(ChannelError) as info:
        Publisher(**config).start()
    assert "did not start" in str(info.value)
    assert str(spool) in str(info.value) and "777" in str(info.value)  # the cause, from its log
    client = SamsaraClient(sourceId="s", start_publishing_thread=False, **config)
    try:
        assert str(spool) in client.stats()["error"]
    finally:
        client.close(timeout=0.1)
    assert not list((Path(runtime_dir) / "cause").glob(".authkey.*"))


# ---- directories given in the config (#11.8) ----
@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="smp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_configured_runtime_dir_open_to_others_is_refused(base: Path) -> None:
    shared = base / "rt"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ChannelError, match=str(shared)):
        Channel(Config.build(url="http://127.0.0.1:1", runtime_dir=str(shared))).ensure_dir()


def test_a_configured_runtime_dir_that_is_a_symlink_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o700)
    link = base / "link"
    link.symlink_to(real)
    with pytest.raises(ChannelError, match="symlink"):
        Channel(Config.build(url="http://127.0.0.1:1", runtime_dir=str(link))).ensure_dir()


def test_a_sticky_shared_runtime_dir_like_tmp_is_accepted(base: Path) -> None:
    sticky = base / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    channel = Channel(Config.build(url="http://127.0.0.1:1", runtime_dir=str(sticky), channel="c"))
    channel.ensure_dir()
    assert (os.stat(channel.dir).st_mode & 0o777) == 0o700


def test_a_planted_spool_file_in_an_open_spool_dir_is_never_sent(
    server: IngestServer, runtime_dir: str, base: Path
) -> None:
    spool = base / "spool"
    spool.mkdir()
    os.chmod(spool, 0o777)
    (spool / "spool-1-1.jsonl").write_text(json.dumps({"eventName": "planted", "sourceId": "x",
                                                       "timestamp": 1}) + "\n")
    config = dict(url=server.url, runtime_dir=runtime_dir, channel="plant", spool_dir=str(spool),
                  send_client_stats=False)
    with pytest.raises(ChannelError, match="spool directory"):
        Publisher(**config).start()
    assert server.event_count() == 0


# ---- smaller ones (#11.9) ----
def test_events_are_refused_naming_what_is_wrong() -> None:
    enc = EventEncoder("s", 1024)
    with pytest.raises(InvalidEvent) as info:
        enc.encode({"eventName": "e", "small": 1, "big": "x" * 2000})
    assert "whole event:" in str(info.value) and "'big'" in str(info.value)
    with pytest.raises(InvalidEvent) as info:
        enc.encode({"eventName": "e", "ok\udcff": 1})
    assert info.value.field == ascii("ok\udcff") and "surrogate" in str(info.value)
    with pytest.raises(InvalidEvent) as info:
        enc.encode({"eventName": "e", "nested": {"inner": {1: "a", "1": "b"}}})
    assert info.value.field == "nested" and "same JSON property name" in str(info.value)
    for ts in (MAX_TIMESTAMP + 1, 2**63, 2**70):
        with pytest.raises(InvalidEvent) as info:
            enc.encode({"eventName": "e", "timestamp": ts})
        assert info.value.field == "timestamp" and "9999" in str(info.value)
    latest = json.loads(enc.encode({"eventName": "e", "timestamp": MAX_TIMESTAMP}))
    assert latest["timestamp"] == MAX_TIMESTAMP
    # Keys that stay distinct are fine, and converted as JSON does.
    assert json.loads(enc.encode({"eventName": "e", "m": {1: "a", "2": "b"}}))["m"] == {"1": "a", "2": "b"}


@pytest.mark.parametrize("events", [None, "events", b"x", {"eventName": "e"}, 5])
def test_publish_events_refuses_what_is_not_a_list_of_events(events: Any, runtime_dir: str) -> None:
    client = SamsaraClient(url="http://127.0.0.1:1", sourceId="s", runtime_dir=runtime_dir,
                           start_publishing_thread=False)
    try:
        with pytest.raises(InvalidEvent) as info:
            client.publish_events(events)
        assert info.value.field == "events"
    finally:
        client.close(timeout=0.1)
