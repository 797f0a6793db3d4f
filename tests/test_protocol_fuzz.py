"""A peer that holds the authkey and sends well-framed nonsense: each malformed request is
answered with an error, counted (protocol_errors), hung up on, and changes nothing else;
everyone else's events are delivered and the books balance."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import _kill_publishers_in, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samsara_mp import Publisher, SamsaraClient
from samsara_mp.ingest import IngestServer
from samsara_mp.ipc import IPCError
from samsara_mp.ledger import unaccounted

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.tuples(inner, inner, inner),
    max_leaves=12,
)
_requests = st.tuples(
    st.sampled_from(["push", "flush", "stats", "instance", "ping", "nope", ""]),
    st.lists(_values, max_size=5).map(tuple),
)


@pytest.fixture(scope="module")
def channel() -> Iterator[tuple[IngestServer, Publisher, dict[str, Any]]]:
    import shutil
    import tempfile

    server = IngestServer(store="memory")
    server.start()
    runtime_dir = tempfile.mkdtemp(prefix="smp-", dir="/tmp")
    config = {"url": server.url, "runtime_dir": runtime_dir, "channel": "fuzz", "publish_interval": 50,
              "min_buffer_size": 1, "send_client_stats": False}
    pub = Publisher(**config).start()
    try:
        yield server, pub, config
    finally:
        pub.stop()
        server.stop()
        _kill_publishers_in(runtime_dir)
        shutil.rmtree(runtime_dir, ignore_errors=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_requests, min_size=1, max_size=6))
def test_malformed_requests_change_nothing_but_protocol_errors(
    channel: tuple[IngestServer, Publisher, dict[str, Any]], requests: list[tuple[str, tuple[Any, ...]]]
) -> None:
    server, pub, config = channel
    before = pub.stats()
    conn = pub.channel.connect(5.0)
    try:
        for method, args in requests:
            try:
                conn.call(method, *args, timeout=5.0)
            except (IPCError, EOFError, OSError):
                conn.close()
                conn = pub.channel.connect(5.0)
    finally:
        conn.close()
    after = pub.stats()
    for key in ("recorded", "received", "delivered", "rejected", "buffered", "dropped_buffer"):
        assert after[key] == before[key], (key, requests)
    assert after["protocol_errors"] >= before["protocol_errors"]


def test_a_client_beside_a_fuzzing_peer_delivers_everything(
    channel: tuple[IngestServer, Publisher, dict[str, Any]]
) -> None:
    server, pub, config = channel
    start = server.event_count()
    conn = pub.channel.connect(5.0)
    with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
        for seq in range(2_000):
            client.record_event(eventName="beside", seq=seq)
            if seq % 500 == 0:
                try:
                    conn.call("push", [1, 2, 3], "x", "y", (0,), timeout=5.0)
                except (IPCError, EOFError, OSError):
                    conn.close()
                    conn = pub.channel.connect(5.0)
        assert client.flush(timeout=20)
        stats = client.stats()["channel"]
    conn.close()
    wait_until(lambda: server.event_count() - start == 2_000, 10, "2,000 delivered")
    assert [e["seq"] for e in server.events() if e["eventName"] == "beside"] == list(range(2_000))
    assert stats["protocol_errors"] >= 4 and unaccounted(stats) == 0
