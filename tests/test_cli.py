"""Behaviour of the ``samsara-mp`` command line, run as real processes on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from samsara_mp import Publisher, SamsaraClient
from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("publisher", "status", "send", "ingest-server", "demo")


def wait_until(pred: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``pred`` until it is truthy; fail with the last value seen at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last saw {value!r}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_MP_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "samsara_mp", *args],
        check=False, capture_output=True, text=True, env=clean_env(), timeout=timeout,
        cwd=ROOT,
    )


def stop_pid(proc: subprocess.Popen[str]) -> None:
    """Kill a process we started, by its pid, if it is still running, and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def server() -> Iterator[IngestServer]:
    srv = IngestServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    # Short on purpose: a Unix socket path must stay under ~100 bytes.
    path = tempfile.mkdtemp(prefix="smp-cli-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------- help
def test_top_level_help_exits_zero_and_lists_every_subcommand() -> None:
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_help_exits_zero(name: str) -> None:
    result = cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"samsara-mp {name}" in result.stdout


def test_console_script_is_the_same_cli() -> None:
    script = Path(sys.executable).with_name("samsara-mp")
    if not script.exists():
        pytest.skip("samsara-mp console script not installed in this environment")
    result = subprocess.run([str(script), "--version"], check=False, capture_output=True,
                            text=True, env=clean_env(), timeout=30)
    assert result.returncode == 0
    assert "samsara-mp" in result.stdout


def test_missing_subcommand_is_a_usage_error() -> None:
    assert cli().returncode == 2


# ------------------------------------------------------------------- send
def test_send_publishes_one_event_with_typed_values(server: IngestServer) -> None:
    result = cli("send", "--url", server.url, "eventName=cli.sent", "sourceId=shell",
                 "level=10", "color=blue", "timestamp=1700000000000")
    assert result.returncode == 0, result.stderr
    assert server.wait_for_events(1, 10)
    (event,) = server.events()
    assert event["eventName"] == "cli.sent"
    assert event["sourceId"] == "shell"
    assert event["level"] == 10
    assert event["color"] == "blue"
    assert event["timestamp"] == 1700000000000


def test_send_fills_in_a_source_id_when_none_is_given(server: IngestServer) -> None:
    result = cli("send", "--url", server.url, "eventName=cli.sent")
    assert result.returncode == 0, result.stderr
    assert server.wait_for_events(1, 10)
    assert server.events()[0]["sourceId"]


def test_send_invalid_event_exits_2_before_sending(server: IngestServer) -> None:
    result = cli("send", "--url", server.url, "eventName=x", "sourceId=s", "timestamp=-1")
    assert result.returncode == 2
    assert "timestamp" in result.stderr
    assert server.stats()["requests"] == 0


def test_send_malformed_pair_exits_2(server: IngestServer) -> None:
    result = cli("send", "--url", server.url, "eventName=x", "not-a-pair")
    assert result.returncode == 2
    assert "key=value" in result.stderr


def test_send_refused_by_the_api_exits_1_and_says_why(server: IngestServer) -> None:
    server.inject(status=400, count=1, body=json.dumps(["sourceId is not allowed here"]))
    result = cli("send", "--url", server.url, "eventName=x", "sourceId=s")
    assert result.returncode == 1
    assert "400" in result.stderr
    assert "sourceId is not allowed here" in result.stderr
    assert server.event_count() == 0


def test_send_unreachable_api_exits_1(server: IngestServer) -> None:
    url = server.url
    server.stop()
    result = cli("send", "--url", url, "eventName=x", "sourceId=s", "--send-timeout", "2000")
    assert result.returncode == 1
    assert "could not reach" in result.stderr


# ------------------------------------------------------------------- status
def test_status_without_a_publisher_exits_3(runtime_dir: str) -> None:
    result = cli("status", "--channel", "nobody-home", "--runtime-dir", runtime_dir)
    assert result.returncode == 3
    assert "nobody-home" in result.stderr


def test_status_without_a_channel_and_no_channels_exits_3(runtime_dir: str) -> None:
    result = cli("status", "--runtime-dir", runtime_dir)
    assert result.returncode == 3
    assert f"no channels under {runtime_dir}" in result.stdout


def test_status_without_a_channel_lists_every_running_channel(
    server: IngestServer, runtime_dir: str
) -> None:
    settings = {"url": server.url, "runtime_dir": runtime_dir, "publish_interval": 100,
                "min_buffer_size": 1, "send_client_stats": False}
    with Publisher(**settings, channel="list-a") as a, Publisher(**settings, channel="list-b") as b:
        with SamsaraClient(**settings, channel="list-a", sourceId="s",
                           start_publishing_thread=False) as client:
            client.record_event(eventName="listed")
            assert client.flush(timeout=20)
        # A channel directory whose publisher is gone is listed as such.
        Channel(Config.build(env={}, url=server.url, channel="list-gone",
                             runtime_dir=runtime_dir)).ensure_dir()
        table = cli("status", "--runtime-dir", runtime_dir)
        as_json = cli("status", "--runtime-dir", runtime_dir, "--json")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[2:]}
    assert set(rows) == {"list-a", "list-b", "list-gone"}, table.stdout
    assert rows["list-a"].split()[1] == str(a.pid) and rows["list-b"].split()[1] == str(b.pid)
    assert rows["list-a"].endswith("alive") and "ago" in rows["list-a"]  # its last success
    assert "never" in rows["list-b"] and "no publisher answers" in rows["list-gone"]
    assert as_json.returncode == 0, as_json.stderr
    listed = {ch["channel"]: ch for ch in json.loads(as_json.stdout)["channels"]}
    assert listed["list-a"]["publisher_pid"] == a.pid and listed["list-b"]["publisher_pid"] == b.pid
    assert listed["list-a"]["loop_alive"] is True and listed["list-a"]["stats"]["delivered"] == 1
    assert listed["list-a"]["buffered"] == 0 and listed["list-b"]["last_success_at"] is None
    assert listed["list-gone"]["running"] is False


# --------------------------------------------------------------- publisher
def test_foreground_publisher_serves_clients_reports_status_and_stops_on_sigterm(
    server: IngestServer, runtime_dir: str
) -> None:
    channel = "cli-fg"
    args = ["publisher", "--url", server.url, "--channel", channel, "--runtime-dir", runtime_dir,
            "--publish-interval", "200", "--min-buffer-size", "1", "--shutdown-timeout", "3000"]
    proc = subprocess.Popen([sys.executable, "-m", "samsara_mp", *args], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        chan = Channel(Config.build(env={}, url=server.url, channel=channel,
                                    runtime_dir=runtime_dir))
        wait_until(lambda: proc.poll() is not None or chan.wait_connectable(0.2, None),
                   15.0, "the publisher to answer")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""

        client = SamsaraClient(url=server.url, sourceId="cli-test", channel=channel,
                               runtime_dir=runtime_dir, start_publishing_thread=False)
        try:
            for k in range(100):
                client.record_event(eventName="cli.fg", seq=k)
            assert client.flush(timeout=20) is True
        finally:
            client.close()
        assert server.wait_for_events(100, 10)
        assert sorted(e["seq"] for e in server.events()) == list(range(100))

        status = cli("status", "--channel", channel, "--runtime-dir", runtime_dir, "--json")
        assert status.returncode == 0, status.stderr
        stats = json.loads(status.stdout)
        assert stats["delivered"] == 100
        assert stats["publisher_pid"] == proc.pid

        table = cli("status", "--channel", channel, "--runtime-dir", runtime_dir)
        assert table.returncode == 0, table.stderr
        assert re.search(r"^delivered\s+100$", table.stdout, re.MULTILINE), table.stdout

        second = cli(*args)
        assert second.returncode == 3
        assert "already has a publisher" in second.stderr

        os.kill(proc.pid, signal.SIGTERM)
        # Nothing is buffered, so it must be gone well within its 3 s shutdown timeout.
        assert proc.wait(timeout=3.0) == 0
    finally:
        stop_pid(proc)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def test_publisher_with_invalid_configuration_exits_2(runtime_dir: str) -> None:
    result = cli("publisher", "--url", "ftp://nowhere", "--runtime-dir", runtime_dir)
    assert result.returncode == 2
    assert "url" in result.stderr


# -------------------------------------------------------------------- demo
def test_demo_delivers_every_event_and_says_so(tmp_path: Path) -> None:
    before = set(Path(tempfile.gettempdir()).glob("samsara-mp-demo-*"))
    result = cli("demo", "--workers", "2", "--events", "2000", "--no-progress", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = re.sub(r"(?<=\d),(?=\d)", "", result.stdout)
    assert re.search(r"delivered\s+4000 \(publisher\), 4000 \(ingestion server\)", out), out
    assert "verdict      OK" in out
    # Its runtime directory is gone, and no demo publisher is left behind.
    assert set(Path(tempfile.gettempdir()).glob("samsara-mp-demo-*")) <= before


def test_demo_rejects_bad_options() -> None:
    assert cli("demo", "--workers", "0").returncode == 2
