"""Prometheus metrics: the publisher's /metrics and ``status --format prometheus``, parsed
with prometheus_client's own parser and checked against the publisher's stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from procs import free_port
from prometheus_client.parser import text_string_to_metric_families

from samsara_mp import InvalidConfiguration, Publisher, SamsaraClient
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, channel: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"channel": channel, **labels}.items())))]


def assert_matches(samples: Samples, channel: str, stats: dict[str, Any]) -> None:
    assert value(samples, "samsara_mp_publisher_up", channel) == 1
    for name, key in (("recorded", "recorded"), ("delivered", "delivered"), ("rejected", "rejected"),
                      ("filtered", "filtered"), ("sampled_out", "sampled_out")):
        assert value(samples, f"samsara_mp_events_{name}_total", channel) == stats[key], name
    assert value(samples, "samsara_mp_retries_total", channel) == stats["retries"]
    for reason, key in (("overflow", "dropped_buffer"), ("staging", "dropped_staging"),
                        ("spool", "dropped_spool")):
        assert value(samples, "samsara_mp_events_dropped_total", channel, reason=reason) == stats[key]
    for status, count in stats["statuses"].items():
        assert value(samples, "samsara_mp_requests_total", channel, status=status) == count
    assert value(samples, "samsara_mp_buffer_events", channel) == stats["buffered"]
    assert value(samples, "samsara_mp_buffer_bytes", channel) == stats["buffered_bytes"]
    assert value(samples, "samsara_mp_last_success_timestamp_seconds", channel) == pytest.approx(
        stats["last_success_at"])


def drop_debug(event: dict[str, Any]) -> dict[str, Any] | None:
    return None if event["eventName"] == "debug" else event


def record_some(config: dict[str, Any]) -> None:
    with SamsaraClient(**config, start_publishing_thread=False, before_send=drop_debug,
                       sample_rate=0.5) as client:
        for s in range(100):
            client.record_event(eventName="page.view", sourceId=f"src-{s}")
            client.record_event(eventName="debug", sourceId=f"src-{s}")
        assert client.flush(timeout=20)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_MP_")}
    return subprocess.run([sys.executable, "-m", "samsara_mp", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp has them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if int(hexport, 16) == port and state == "0A":
                found.append(addr)
    return found


def test_the_publisher_serves_metrics_that_match_its_stats(
    fast_config: dict[str, Any], server: IngestServer
) -> None:
    port = free_port()
    with Publisher(**fast_config, metrics_port=port) as pub:
        record_some(fast_config)
        stats = pub.stats()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            first = parse(answer.read().decode())
        assert_matches(first, "t", stats)
        assert stats["filtered"] > 0 and stats["sampled_out"] > 0 and stats["delivered"] > 0
        assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only, by default
        record_some(fast_config)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            second = parse(answer.read().decode())
    counters = [key for key in first if key[0].endswith("_total")]
    assert counters and all(second[key] >= first[key] for key in counters)
    assert value(second, "samsara_mp_events_recorded_total", "t") == 2 * stats["recorded"]
    assert server.event_count() == 2 * stats["delivered"]


def test_status_format_prometheus_matches_the_stats(fast_config: dict[str, Any], runtime_dir: str) -> None:
    with Publisher(**fast_config) as pub:
        record_some(fast_config)
        stats = pub.stats()
        result = cli("status", "--channel", "t", "--runtime-dir", runtime_dir, "--format", "prometheus")
    assert result.returncode == 0, result.stderr
    assert_matches(parse(result.stdout), "t", stats)
    down = cli("status", "--channel", "t", "--runtime-dir", runtime_dir, "--format", "prometheus")
    assert down.returncode == 3
    assert value(parse(down.stdout), "samsara_mp_publisher_up", "t") == 0


def test_status_of_every_channel_in_prometheus_format(
    fast_config: dict[str, Any], runtime_dir: str
) -> None:
    other = dict(fast_config, channel="t2")
    with Publisher(**fast_config) as a, Publisher(**other) as b:
        record_some(fast_config)
        result = cli("status", "--runtime-dir", runtime_dir, "--format", "prometheus")
        stats_a, stats_b = a.stats(), b.stats()
    assert result.returncode == 0, result.stderr
    samples = parse(result.stdout)
    assert_matches(samples, "t", stats_a)
    assert value(samples, "samsara_mp_publisher_up", "t2") == 1
    assert value(samples, "samsara_mp_events_recorded_total", "t2") == stats_b["recorded"] == 0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"metrics_port": -1}, "metrics_port"), ({"metrics_port": 70000}, "metrics_port"),
     ({"metrics_port": "9100"}, "metrics_port"), ({"metrics_host": ""}, "metrics_host")],
)
def test_bad_metrics_settings_raise_naming_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(url="http://127.0.0.1:1/", env={}, **kwargs)
    assert info.value.key == key


def test_metrics_port_comes_from_the_environment() -> None:
    cfg = Config.build(env={"SAMSARA_MP_URL": "http://127.0.0.1:1/", "SAMSARA_MP_METRICS_PORT": "9464"})
    assert (cfg.metrics_port, cfg.metrics_host) == (9464, "127.0.0.1")
    assert json.loads(json.dumps(cfg.to_dict()))["metrics_port"] == 9464
