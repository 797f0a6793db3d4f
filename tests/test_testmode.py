"""before_send, sample_rate, disabled, and the test mode (capture_events, samsara_events).

Real pieces throughout: a real IngestServer and publisher process where events
are sent, and real pytest and interpreter subprocesses for the test mode.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from samsara_mp import InvalidConfiguration, InvalidEvent, SamsaraClient, get_client
from samsara_mp._env import export_to_env
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer
from samsara_mp.testing import capture_events

ROOT = Path(__file__).resolve().parent.parent


# ---- hooks referenced by their "module:function" path ----
def redact(event: dict[str, Any]) -> dict[str, Any] | None:
    """Drops debug events; removes the password of the others."""
    if event["eventName"] == "debug.noise":
        return None
    event.pop("password", None)
    return event


def explode(event: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError(f"hook bug on {event['eventName']}")


NOT_CALLABLE = 42


# ---- configuration ----
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"before_send": "no_such_module_xyz:hook"}, "before_send"),
        ({"before_send": "test_testmode:missing"}, "before_send"),
        ({"before_send": "test_testmode:NOT_CALLABLE"}, "before_send"),
        ({"before_send": "nocolon"}, "before_send"),
        ({"before_send": 42}, "before_send"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"sample_rate": float("nan")}, "sample_rate"),
        ({"sample_rate": "0.5"}, "sample_rate"),
        ({"sample_rate": True}, "sample_rate"),
        ({"disabled": "yes"}, "disabled"),
    ],
)
def test_bad_values_of_the_new_keys_raise_naming_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(url="http://127.0.0.1:1/", env={}, **kwargs)
    assert info.value.key == key


def test_new_keys_come_from_the_environment() -> None:
    env = {"SAMSARA_MP_URL": "http://127.0.0.1:1/", "SAMSARA_MP_SAMPLE_RATE": "0.25",
           "SAMSARA_MP_DISABLED": "1", "SAMSARA_MP_BEFORE_SEND": "test_testmode:redact"}
    cfg = Config.build(env=env)
    assert (cfg.sample_rate, cfg.disabled, cfg.before_send_hook) == (0.25, True, redact)
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={"SAMSARA_MP_URL": "http://127.0.0.1:1/", "SAMSARA_MP_SAMPLE_RATE": "half"})
    assert info.value.key == "sample_rate"


def test_a_disabled_client_needs_no_url() -> None:
    assert Config.build(env={"SAMSARA_MP_DISABLED": "true"}).disabled is True
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={})
    assert info.value.key == "url"


def test_a_callable_before_send_crosses_processes_only_as_an_importable_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = Config.build(url="http://127.0.0.1:1/", env={}, before_send=lambda e: e)
    assert json.loads(json.dumps(cfg.to_dict()))["before_send"] is None
    by_function = Config.build(url="http://127.0.0.1:1/", env={}, before_send=redact)
    assert by_function.to_dict()["before_send"] == "test_testmode:redact"
    by_path = Config.build(url="http://127.0.0.1:1/", env={}, before_send="test_testmode:redact")
    assert by_path.to_dict()["before_send"] == "test_testmode:redact"
    export_to_env({"before_send": redact, "sample_rate": 0.5})
    assert os.environ["SAMSARA_MP_BEFORE_SEND"] == "test_testmode:redact"
    assert os.environ["SAMSARA_MP_SAMPLE_RATE"] == "0.5"
    del os.environ["SAMSARA_MP_BEFORE_SEND"]
    caplog.set_level(logging.WARNING, logger="samsara_mp")
    export_to_env({"before_send": lambda e: e})
    assert "SAMSARA_MP_BEFORE_SEND" not in os.environ
    assert "cannot import" in caplog.text


GUNICORN_CONF = """
import os
from samsara_mp import InvalidConfiguration
from samsara_mp.integrations import gunicorn
from workers import drop_secrets

try:
    gunicorn.configure(url="http://127.0.0.1:1/", before_send=lambda e: e)
except InvalidConfiguration as exc:
    print("refused", exc.key)
gunicorn.configure(url="http://127.0.0.1:1/", before_send=drop_secrets)
print("exported", os.environ["SAMSARA_MP_BEFORE_SEND"])
"""


def test_gunicorn_configure_refuses_a_before_send_its_workers_cannot_import() -> None:
    # In a process of its own: configure() makes its process the channel's expected owner.
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", GUNICORN_CONF], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["refused before_send", "exported workers:drop_secrets"]


def test_spawned_pool_workers_run_a_callable_before_send(
    fast_config: dict[str, Any], server: IngestServer
) -> None:
    import multiprocessing

    from workers import drop_secrets, record_login

    from samsara_mp.integrations.multiprocessing import PoolPublisher

    ctx = multiprocessing.get_context("spawn")
    with PoolPublisher(**fast_config, sourceId="pool", before_send=drop_secrets) as pub:
        with ctx.Pool(2, **pub.pool_kwargs()) as pool:
            assert pool.map(record_login, range(40)) == list(range(40))
        stats = wait_until(lambda: (s := pub.stats())["delivered"] == 40 and s, 20, "40 delivered")
    assert stats["filtered"] == 40 and stats["recorded"] == 40
    events = server.events()
    assert sorted(e["n"] for e in events) == list(range(40))
    assert all(e["eventName"] == "user.login" and "password" not in e for e in events)


# ---- before_send through a real publisher and server ----
def test_before_send_redacts_and_drops_and_the_server_never_sees_what_it_removed(
    fast_config: dict[str, Any], server: IngestServer
) -> None:
    with SamsaraClient(**fast_config, sourceId="svc", before_send="test_testmode:redact") as client:
        for i in range(50):
            client.record_event(eventName="user.login", user=i, password=f"secret-{i}")
            client.record_event(eventName="debug.noise", user=i)
        assert client.flush(timeout=20)
        stats = client.stats()
    pub = stats["channel"]
    events = server.events()
    assert len(events) == 50
    assert all("password" not in e and e["eventName"] == "user.login" for e in events)
    assert not any("secret-" in json.dumps(e) for e in events)
    assert sorted(e["user"] for e in events) == list(range(50))
    local = stats["local"]
    assert (local["recorded"], local["filtered"], local["before_send_errors"]) == (50, 50, 0)
    # The channel learnt of them with the pushes; they are not recorded.
    assert (pub["recorded"], pub["delivered"], pub["filtered"]) == (50, 50, 50)


def test_a_raising_before_send_drops_counts_and_logs_rate_limited(
    fast_config: dict[str, Any], server: IngestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="samsara_mp")
    with SamsaraClient(**fast_config, sourceId="svc", before_send=explode) as client:
        for i in range(200):
            client.record_event(eventName="user.login", password=f"secret-{i}")  # never raises
        local = client.stats()["local"]
        assert client.flush(timeout=20)
    assert (local["filtered"], local["before_send_errors"], local["recorded"]) == (200, 200, 0)
    lines = [r for r in caplog.records if "before_send raised" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # 200 errors within 10 s: one line
    assert server.event_count() == 0


def test_what_before_send_returns_is_validated(fast_config: dict[str, Any]) -> None:
    def strip_name(event: dict[str, Any]) -> dict[str, Any]:
        return {"user": event["user"]}

    def not_a_dict(event: dict[str, Any]) -> Any:
        return "oops"

    with capture_events() as seen:
        client = SamsaraClient(**fast_config, sourceId="svc", before_send=strip_name)
        with pytest.raises(InvalidEvent) as info:
            client.record_event(eventName="a", user=1)
        assert info.value.field == "eventName"
        client = SamsaraClient(**fast_config, sourceId="svc", before_send=not_a_dict)
        with pytest.raises(InvalidEvent):
            client.record_event(eventName="a", user=1)
        # Enrichment happened before the hook: it sees sourceId and timestamp.
        client = SamsaraClient(**fast_config, sourceId="svc", before_send=lambda e: dict(e, seen=sorted(e)))
        client.record_event(eventName="a", user=1)
    assert seen[0]["seen"] == ["eventName", "sourceId", "timestamp", "user"]


def test_publish_events_applies_before_send(fast_config: dict[str, Any], server: IngestServer) -> None:
    client = SamsaraClient(**dict(fast_config, start_publishing_thread=False), sourceId="svc",
                           before_send=redact)
    try:
        assert client.publish_events([{"eventName": "user.login", "password": "pw", "n": 1},
                                      {"eventName": "debug.noise"}])
        with pytest.raises(InvalidEvent) as info:
            client.publish_events([{"eventName": "ok"}, {"password": "pw"}])
        assert info.value.field == "events[1].eventName"
        assert client.stats()["local"]["filtered"] == 1
    finally:
        client.close()
    events = server.events()
    assert [(e["eventName"], "password" in e) for e in events] == [("user.login", False)]


# ---- sampling ----
def test_sampling_keeps_whole_sources_in_a_fraction_within_tolerance(fast_config: dict[str, Any]) -> None:
    rate, sources, per_source = 0.3, 400, 5
    with capture_events() as seen:
        client = SamsaraClient(**fast_config, sample_rate=rate)
        for round_ in range(per_source):
            for s in range(sources):
                client.record_event(eventName="page.view", sourceId=f"user-{s}", round=round_)
        stats = client.stats()["local"]
        again = SamsaraClient(**fast_config, sample_rate=rate)
        for s in range(sources):
            again.record_event(eventName="page.view", sourceId=f"user-{s}")
    kept = Counter(e["sourceId"] for e in seen if "round" in e)
    # A kept source keeps every event; about rate of the sources are kept.
    assert set(kept.values()) == {per_source}
    assert abs(len(kept) / sources - rate) < 0.07, len(kept)
    assert stats["sampled_out"] == (sources - len(kept)) * per_source
    # Deterministic: another client (another process alike) keeps the same sources.
    assert {e["sourceId"] for e in seen if "round" not in e} == set(kept)
    # The documented rule: crc32 of the UTF-8 sourceId, below rate * 2**32.
    assert set(kept) == {f"user-{s}" for s in range(sources)
                         if zlib.crc32(f"user-{s}".encode()) < int(rate * 2**32)}


def test_sampled_out_events_reach_the_channel_stats_and_never_the_server(
    fast_config: dict[str, Any], server: IngestServer
) -> None:
    with SamsaraClient(**fast_config, sample_rate=0.5) as client:
        for s in range(400):
            client.record_event(eventName="page.view", sourceId=f"src-{s}")
        assert client.flush(timeout=20)
        stats = client.stats()
    local, chan = stats["local"], stats["channel"]
    assert local["recorded"] + local["sampled_out"] == 400
    assert 100 < local["recorded"] < 300
    assert chan["sampled_out"] == local["sampled_out"] and chan["recorded"] == local["recorded"]
    assert server.event_count() == local["recorded"]
    assert all(zlib.crc32(e["sourceId"].encode()) < 2**31 for e in server.events())


def test_sample_rate_zero_keeps_nothing_and_one_keeps_all(fast_config: dict[str, Any]) -> None:
    with capture_events() as seen:
        none = SamsaraClient(**fast_config, sample_rate=0.0)
        every = SamsaraClient(**fast_config, sample_rate=1.0)
        for s in range(50):
            none.record_event(eventName="a", sourceId=f"s{s}")
            every.record_event(eventName="b", sourceId=f"s{s}")
    assert [e["eventName"] for e in seen] == ["b"] * 50
    assert none.stats()["local"]["sampled_out"] == 50


# ---- capture_events in this process ----
def test_capture_takes_a_running_clients_events_and_gives_it_back_after(
    fast_config: dict[str, Any], server: IngestServer
) -> None:
    with SamsaraClient(**fast_config, sourceId="svc") as client:
        client.record_event(eventName="before")
        assert client.flush(timeout=20)
        with capture_events() as seen:
            client.record_event(eventName="inside", n=1)
            get_client(**fast_config, sourceId="svc").record_event(eventName="inside", n=2)
            assert client.flush(timeout=5)
        client.record_event(eventName="after")
        assert client.flush(timeout=20)
        get_client().close()
    assert [e["eventName"] for e in server.events()] == ["before", "after"]
    assert [(e["eventName"], e["n"], e["sourceId"]) for e in seen] == [("inside", 1, "svc"),
                                                                       ("inside", 2, "svc")]
    assert all(isinstance(e["timestamp"], int) for e in seen)


# ---- the pytest fixture, in a user's test run ----
USER_TESTS = '''
import os
import threading

import pytest

from samsara_mp import InvalidEvent, SamsaraClient, get_client

RUNTIME = os.environ["SAMSARA_MP_RUNTIME_DIR"]
# An app module's client, made at import (it only connects: no publisher, no thread).
APP_CLIENT = SamsaraClient(sourceId="app", start_publishing_thread=False)
THREADS = threading.active_count()


def children():
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        found.append(entry)
            except OSError:
                pass
    return found


def nothing_started():
    assert threading.active_count() == THREADS
    assert children() == []
    for root, _dirs, files in os.walk(RUNTIME):
        assert "publisher.json" not in files and "publisher.sock" not in files, root


def test_events_are_captured_from_every_client(samsara_events):
    APP_CLIENT.record_event(eventName="app.started")
    client = SamsaraClient(sourceId="svc")  # would launch a publisher outside the test mode
    client.record_event(eventName="user.login", user=7)
    get_client(sourceId="shared").record_event(eventName="cart.updated", total=3.5)
    with pytest.raises(InvalidEvent):
        client.record_event(eventName="bad", value=float("nan"))
    names = [(e["eventName"], e["sourceId"]) for e in samsara_events]
    assert names == [("app.started", "app"), ("user.login", "svc"), ("cart.updated", "shared")]
    assert samsara_events[1]["user"] == 7 and isinstance(samsara_events[1]["timestamp"], int)
    assert client.flush(timeout=1) and client.stats()["local"]["recorded"] == 0
    client.close()
    nothing_started()


def test_the_list_is_fresh_for_each_test(samsara_events):
    assert samsara_events == []
    APP_CLIENT.record_event(eventName="second")
    assert [e["eventName"] for e in samsara_events] == ["second"]
    nothing_started()


def test_no_url_configured_is_fine_inside_the_test_mode(samsara_events, monkeypatch):
    monkeypatch.delenv("SAMSARA_MP_URL")
    client = SamsaraClient(sourceId="offline")
    client.record_event(eventName="x")
    assert [e["eventName"] for e in samsara_events] == ["x"]
    nothing_started()


def test_zz_nothing_was_started_by_any_test():
    nothing_started()
'''


def test_the_samsara_events_fixture_in_a_users_pytest_run(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    test_file = tmp_path / "test_user_app.py"
    test_file.write_text(USER_TESTS)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SAMSARA_MP_", "PYTEST_"))}
    env.update(SAMSARA_MP_URL=server.url, SAMSARA_MP_RUNTIME_DIR=runtime_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout, proc.stdout
    assert server.event_count() == 0 and server.requests() == []
    assert os.listdir(runtime_dir) == []  # no channel directory was even made


DISABLED_SCRIPT = '''
import json, os, sys, threading
from samsara_mp import InvalidEvent, get_client

threads = threading.active_count()
client = get_client(sourceId="svc")
for i in range(100):
    client.record_event(eventName="page.view", n=i)
try:
    client.record_event(eventName="")
    refused = False
except InvalidEvent:
    refused = True
flushed = client.flush(timeout=1)
stats = client.stats()
print(json.dumps({"threads_before": threads, "threads_after": threading.active_count(),
                  "refused": refused, "flushed": flushed, "local": stats["local"],
                  "channel": stats["channel"], "runtime": os.listdir(os.environ["SAMSARA_MP_RUNTIME_DIR"])}))
'''


@pytest.mark.parametrize("with_url", [True, False])
def test_samsara_mp_disabled_starts_no_thread_and_no_publisher(
    server: IngestServer, runtime_dir: str, with_url: bool
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_MP_")}
    env.update(SAMSARA_MP_DISABLED="1", SAMSARA_MP_RUNTIME_DIR=runtime_dir)
    if with_url:
        env["SAMSARA_MP_URL"] = server.url
    proc = subprocess.run([sys.executable, "-c", DISABLED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["threads_after"] == out["threads_before"] == 1
    assert out["refused"] and out["flushed"] and out["channel"] is None
    assert (out["local"]["disabled"], out["local"]["recorded"], out["local"]["staged"]) == (100, 0, 0)
    assert out["runtime"] == []
    assert server.event_count() == 0


def test_a_publisher_never_gets_before_send(fast_config: dict[str, Any], server: IngestServer) -> None:
    # The string form resolves here; the publisher is started without it (and could not import it).
    with SamsaraClient(**fast_config, sourceId="svc", before_send="test_testmode:redact") as client:
        client.record_event(eventName="user.login", password="pw")
        assert client.flush(timeout=20)
        pid = client.stats()["channel"]["publisher_pid"]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().decode()
    assert "before_send" not in cmdline and "test_testmode" not in cmdline
    wait_until(lambda: server.event_count() == 1, 10, "the redacted event")
    assert "password" not in server.events()[0]
