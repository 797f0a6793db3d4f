"""Behaviour of the reference Ingestion API server (samsara_mp.ingest), over real HTTP."""

from __future__ import annotations

import gzip
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samsara_mp.ingest import IngestServer, validate_events
from samsara_mp.ingest.server import MISSING_HEADER_WARNING

ROOT = Path(__file__).resolve().parents[1]
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def ev(i: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "timestamp": 1_700_000_000_000 + i,
        "eventName": "clicked",
        "sourceId": f"s{i % 3}",
        **extra,
    }


def post(
    url: str,
    events: Any,
    *,
    compress: bool = True,
    published: str | None = "1700000000123",
    headers: dict[str, str] | None = None,
    session: requests.Session | None = None,
    raw: bytes | None = None,
    timeout: float = 10,
) -> requests.Response:
    body = raw if raw is not None else json.dumps(events).encode()
    hdrs = dict(JSON_HEADERS)
    if compress:
        body = gzip.compress(body)
        hdrs["Content-Encoding"] = "gzip"
    if published is not None:
        hdrs["X-Samsara-publishedTimestamp"] = published
    hdrs.update(headers or {})
    return (session or requests).post(f"{url}/v1/events", data=body, headers=hdrs, timeout=timeout)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def make_server() -> Iterator[Callable[..., IngestServer]]:
    started: list[IngestServer] = []

    def make(**kwargs: Any) -> IngestServer:
        srv = IngestServer(**kwargs)
        started.append(srv)
        return srv.start()

    try:
        yield make
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture
def server(make_server: Callable[..., IngestServer]) -> IngestServer:
    return make_server()


# ----------------------------------------------------------------- accepting


def test_gzip_and_identity_bodies_store_the_same_events(server: IngestServer) -> None:
    batch = [ev(i, props={"n": i, "s": "é"}) for i in range(5)]
    assert post(server.url, batch, compress=True).status_code == 202
    assert post(server.url, batch, compress=False).status_code == 202
    stored = server.events()
    strip = [{k: v for k, v in e.items() if k not in ("receivedAt", "publishedAt")} for e in stored]
    assert strip[:5] == batch and strip[5:] == batch
    assert [r["headers"].get("Content-Encoding") for r in server.requests()] == ["gzip", None]


def test_accepted_events_get_received_and_published_timestamps(server: IngestServer) -> None:
    before = time.time() * 1000
    resp = post(server.url, [ev(1), ev(2)], published="1700000000999")
    after = time.time() * 1000
    assert resp.status_code == 202 and resp.content == b""
    for stored in server.events():
        assert stored["publishedAt"] == 1700000000999
        assert before - 1 <= stored["receivedAt"] <= after + 1


def test_missing_published_header_is_accepted_with_a_warning(server: IngestServer) -> None:
    resp = post(server.url, [ev()], published=None)
    assert resp.status_code == 202
    assert resp.json() == {"status": "OK", "warning": MISSING_HEADER_WARNING}
    assert "publishedAt" not in server.events()[0]


def test_empty_array_is_accepted(server: IngestServer) -> None:
    assert post(server.url, []).status_code == 202
    assert server.event_count() == 0


# ----------------------------------------------------------------- rejecting


def test_three_bad_events_reject_the_whole_batch_with_a_positional_answer(
    server: IngestServer,
) -> None:
    batch = [ev(i) for i in range(100)]
    del batch[7]["timestamp"]
    batch[50]["timestamp"] = True
    batch[99]["eventName"] = ""
    resp = post(server.url, batch)
    assert resp.status_code == 400
    answer = resp.json()
    assert len(answer) == 100
    assert answer[7] == "timestamp: missing"
    assert answer[50].startswith("timestamp: must be an integer")
    assert answer[99] == "eventName: must be a non-empty string"
    assert [i for i, a in enumerate(answer) if a != "OK"] == [7, 50, 99]
    assert server.event_count() == 0 and server.events() == []
    stats = server.stats()
    assert stats["rejected_requests"] == 1 and stats["rejected_events"] == 3


def test_content_type_with_charset_or_missing_is_refused(server: IngestServer) -> None:
    resp = post(server.url, [ev()], headers={"Content-Type": "application/json; charset=utf-8"})
    assert resp.status_code == 415
    assert resp.json()["status"] == "ERROR" and resp.json()["message"]
    resp = requests.post(f"{server.url}/v1/events", data=b"[]", timeout=10)
    assert resp.status_code == 415
    vendor = post(server.url, [ev()], headers={"Content-Type": "application/vnd.samsara+json"})
    assert vendor.status_code == 202
    assert server.event_count() == 1


def test_malformed_json_or_gzip_answers_plain_text_400(server: IngestServer) -> None:
    bad_json = post(server.url, None, compress=False, raw=b'[{"timestamp": 1,')
    assert bad_json.status_code == 400
    assert bad_json.headers["Content-Type"].startswith("text/plain")
    bad_gzip = post(
        server.url,
        None,
        compress=False,
        raw=b"definitely not gzip",
        headers={"Content-Encoding": "gzip"},
    )
    assert bad_gzip.status_code == 400
    assert bad_gzip.headers["Content-Type"].startswith("text/plain")
    assert server.event_count() == 0


def test_body_that_is_not_an_array_is_refused(server: IngestServer) -> None:
    resp = post(server.url, ev())
    assert resp.status_code == 400
    assert isinstance(resp.json(), list)
    assert server.event_count() == 0


def test_non_numeric_published_header_answers_json_400(server: IngestServer) -> None:
    resp = post(server.url, [ev()], published="yesterday")
    assert resp.status_code == 400
    body = resp.json()
    assert body["status"] == "ERROR" and "X-Samsara-publishedTimestamp" in body["message"]
    assert server.event_count() == 0


def test_unknown_path_answers_404_json(server: IngestServer) -> None:
    resp = requests.get(f"{server.url}/v2/whatever", timeout=10)
    assert resp.status_code == 404
    assert resp.json() == {"status": "ERROR", "message": "Not found"}
    assert requests.get(f"{server.url}/v1/events", timeout=10).status_code == 404


# ---------------------------------------------------------------- api-status


def test_api_status_follows_admin_put_and_offline_refuses_posts(server: IngestServer) -> None:
    status_url = f"{server.url}/v1/api-status"
    admin_status = f"{server.admin_url}/v1/api-status"
    resp = requests.get(status_url, timeout=10)
    assert (resp.status_code, resp.json()) == (200, {"status": "online"})

    assert requests.put(admin_status, json={"status": "offline"}, timeout=10).status_code == 200
    resp = requests.get(status_url, timeout=10)
    assert (resp.status_code, resp.json()) == (503, {"status": "offline"})
    assert post(server.url, [ev()]).status_code == 503
    assert server.event_count() == 0

    assert requests.put(admin_status, json={"status": "sleepy"}, timeout=10).status_code == 400
    assert requests.put(admin_status, json={"status": "online"}, timeout=10).status_code == 200
    assert requests.get(status_url, timeout=10).status_code == 200
    assert post(server.url, [ev()]).status_code == 202


# -------------------------------------------------------------------- faults


def test_injected_faults_are_consumed_then_the_server_recovers(server: IngestServer) -> None:
    rule: dict[str, Any] = {"status": 503, "count": 3, "retry_after": "2"}
    resp = requests.post(f"{server.admin_url}/_test/faults", json=rule, timeout=10)
    assert resp.status_code == 200
    with requests.Session() as session:
        answers = [post(server.url, [ev(i)], session=session) for i in range(4)]
    assert [a.status_code for a in answers] == [503, 503, 503, 202]
    assert [a.headers.get("Retry-After") for a in answers[:3]] == ["2", "2", "2"]
    assert "Retry-After" not in answers[3].headers
    assert server.event_count() == 1 and server.events()[0]["timestamp"] == ev(3)["timestamp"]
    assert server.stats()["faults_served"] == 3


def test_faults_queue_in_order_and_can_be_cleared(server: IngestServer) -> None:
    server.inject(status=500, count=1, body="boom")
    server.inject(status=429, count=1, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    first = post(server.url, [ev()])
    second = post(server.url, [ev()])
    assert (first.status_code, first.text) == (500, "boom")
    assert second.status_code == 429
    assert second.headers["Retry-After"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    server.inject(status=503, count=5)
    resp = requests.delete(f"{server.admin_url}/_test/faults", timeout=10)
    assert resp.json()["cleared_rules"] == 1
    assert post(server.url, [ev()]).status_code == 202


def test_invalid_fault_is_refused_by_admin(server: IngestServer) -> None:
    bad = requests.post(f"{server.admin_url}/_test/faults", json={"count": 0}, timeout=10)
    assert bad.status_code == 400
    bad = requests.post(f"{server.admin_url}/_test/faults", json={"mode": "explode"}, timeout=10)
    assert bad.status_code == 400


def test_latency_delays_the_answer(server: IngestServer) -> None:
    server.inject(status=None, latency=0.3)
    started = time.monotonic()
    resp = post(server.url, [ev()])
    assert resp.status_code == 202
    assert time.monotonic() - started >= 0.3
    assert server.event_count() == 1


def test_hang_is_released_by_stop(make_server: Callable[..., IngestServer]) -> None:
    server = make_server()
    server.inject(mode="hang")
    outcome: dict[str, BaseException | requests.Response] = {}

    def client() -> None:
        try:
            outcome["answer"] = post(server.url, [ev()], timeout=20)
        except requests.RequestException as exc:
            outcome["answer"] = exc

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert server.wait_for_requests(1, timeout=5)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    thread.join(5)
    assert isinstance(outcome.get("answer"), requests.ConnectionError)
    assert server.event_count() == 0


def test_hang_with_hang_seconds_ends_by_itself(server: IngestServer) -> None:
    server.inject(mode="hang", hang_seconds=0.2)
    with pytest.raises(requests.ConnectionError):
        post(server.url, [ev()])
    assert post(server.url, [ev()]).status_code == 202
    assert server.stats()["unanswered"] == 1


def test_reset_closes_the_connection_without_an_answer(server: IngestServer) -> None:
    server.inject(mode="reset")
    with pytest.raises(requests.ConnectionError):
        post(server.url, [ev()])
    assert server.event_count() == 0
    assert post(server.url, [ev()]).status_code == 202


# --------------------------------------------------------- shape and storage


def test_keep_alive_reuses_one_connection(server: IngestServer) -> None:
    with requests.Session() as session:
        for i in range(5):
            assert post(server.url, [ev(i)], session=session).status_code == 202
    assert server.stats()["connections"] == 1


def test_path_prefix_is_part_of_the_endpoint(make_server: Callable[..., IngestServer]) -> None:
    server = make_server(prefix="/ingest/")
    assert server.url.endswith("/ingest")
    assert post(server.url, [ev()]).status_code == 202
    bare = server.url.removesuffix("/ingest")
    assert post(bare, [ev()]).status_code == 404
    assert requests.get(f"{server.url}/v1/api-status", timeout=10).status_code == 200
    assert server.requests()[0]["path"] == "/ingest/v1/events"


def test_file_store_writes_one_json_line_per_event(
    make_server: Callable[..., IngestServer], tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    server = make_server(store="file", out_path=str(out))
    assert post(server.url, [ev(0), ev(1)]).status_code == 202
    assert post(server.url, [ev(2)]).status_code == 202
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["timestamp"] for e in lines] == [ev(i)["timestamp"] for i in range(3)]
    assert all(e["publishedAt"] == 1700000000123 and "receivedAt" in e for e in lines)
    assert server.events() == [] and server.event_count() == 3


def test_count_store_validates_and_counts_only(make_server: Callable[..., IngestServer]) -> None:
    server = make_server(store="count")
    assert post(server.url, [ev(i) for i in range(50)]).status_code == 202
    assert post(server.url, [{"timestamp": -1}]).status_code == 400
    assert server.event_count() == 50 and server.events() == []


def test_admin_reports_stats_and_events_and_resets(server: IngestServer) -> None:
    post(server.url, [ev(i) for i in range(5)])
    post(server.url, [{"eventName": "x"}])
    stats = requests.get(f"{server.admin_url}/_test/stats", timeout=10).json()
    assert stats["requests"] == 2 and stats["accepted_events"] == 5
    assert stats["rejected_requests"] == 1 and stats["statuses"] == {"202": 1, "400": 1}
    assert stats["bytes_in"] == sum(r["body_bytes"] for r in server.requests()) > 0
    page = requests.get(f"{server.admin_url}/_test/events?offset=1&limit=2", timeout=10).json()
    assert [e["timestamp"] for e in page] == [ev(1)["timestamp"], ev(2)["timestamp"]]
    assert requests.post(f"{server.admin_url}/_test/reset", timeout=10).status_code == 200
    assert server.event_count() == 0 and server.requests() == []
    assert server.stats()["requests"] == 0


def test_wait_for_events_wakes_on_arrival_and_times_out(server: IngestServer) -> None:
    assert server.wait_for_events(1, timeout=0.05) is False
    sender = threading.Thread(target=post, args=(server.url, [ev(), ev(1)]), daemon=True)
    sender.start()
    assert server.wait_for_events(2, timeout=5) is True
    sender.join(5)


def test_stop_is_idempotent_and_ends_idle_keep_alive_connections() -> None:
    server = IngestServer().start()
    session = requests.Session()
    try:
        assert post(server.url, [ev()], session=session).status_code == 202
        started = time.monotonic()
        server.stop()
        server.stop()
        assert time.monotonic() - started < 3
        with pytest.raises(requests.ConnectionError):
            post(server.url, [ev()], session=session, timeout=3)
    finally:
        session.close()
        server.stop()


# ---------------------------------------------------------------- validation


@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "timestamp": st.one_of(
                    st.integers(-5, 5), st.booleans(), st.floats(0, 1), st.none()
                ),
                "eventName": st.one_of(st.text(alphabet="ab", max_size=2), st.integers()),
                "sourceId": st.one_of(st.text(alphabet="ab", max_size=2), st.none()),
            },
        ),
        max_size=8,
    )
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_validation_answer_is_positional_and_ok_exactly_for_valid_events(
    events: list[dict[str, Any]],
) -> None:
    def valid(e: dict[str, Any]) -> bool:
        ts, name, src = e.get("timestamp"), e.get("eventName"), e.get("sourceId")
        return (
            type(ts) is int
            and ts >= 0
            and isinstance(name, str)
            and name != ""
            and isinstance(src, str)
            and src != ""
        )

    answer = validate_events(events)
    if all(valid(e) for e in events):
        assert answer is None
    else:
        assert answer is not None and len(answer) == len(events)
        assert [a == "OK" for a in answer] == [valid(e) for e in events]


# ------------------------------------------------------------------------ CLI


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no ready line within {timeout}s (exit={proc.poll()})")
    return proc.stdout.readline()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_prints_ready_line_serves_and_exits_0_on_signal(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    out = tmp_path / "cli.jsonl"
    ready_file = tmp_path / "ready.json"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [
        sys.executable, "-m", "samsara_mp.ingest",
        "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
        "--store", "file", "--out", str(out), "--ready-file", str(ready_file),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        ready = json.loads(_read_line(proc, timeout=10))
        assert ready["pid"] == proc.pid
        assert json.loads(ready_file.read_text()) == ready
        assert post(ready["url"], [ev(1), ev(2)]).status_code == 202
        stats = requests.get(f"{ready['admin_url']}/_test/stats", timeout=10).json()
        assert stats["accepted_events"] == 2
        os.kill(ready["pid"], stop_signal)
        assert proc.wait(timeout=10) == 0
        assert len(out.read_text().splitlines()) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ---- the fast body decoder decides exactly as the stdlib one ----
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**70), max_value=2**70) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
_ODD_BODIES = [
    b"[1" + b"0" * 30 + b"]", b"[-9223372036854775809]", b"[18446744073709551616]", b'["\\ud800"]',
    b"[NaN]", b"[Infinity]", b"[1e400]", b"[1e-400]", b"[-0, -0.0, 1E2]", b'{"a":1,"a":2}', b" [1] ",
    b'["\xff"]', b"\xef\xbb\xbf[1]", b"[1,]", b"", b"[" * 2000 + b"]" * 2000, b'["a\x00"]',
    b'[{"timestamp": 12345678901234567890123, "eventName": "e", "sourceId": "s"}]',
    b'["1234567890123456789012"]', b"[9223372036854775807, -9223372036854775808, 18446744073709551615]",
]


def _decide(decode: Callable[[bytes], Any], body: bytes) -> tuple[str, Any]:
    try:
        value = decode(body)
    except (ValueError, RecursionError):
        return ("refused", None)
    return ("parsed", json.dumps(value, sort_keys=True, allow_nan=True))  # type and value, deeply


@pytest.mark.parametrize("body", _ODD_BODIES, ids=range(len(_ODD_BODIES)))
def test_fast_decoder_agrees_with_the_stdlib_on_odd_bodies(body: bytes) -> None:
    from samsara_mp.ingest import _validation as v

    assert v.orjson is not None  # the test extra installs it: this compares two decoders
    assert _decide(v.decode_body, body) == _decide(v._stdlib_decode, body)


@settings(max_examples=300, deadline=None)
@given(value=_JSON_VALUES, ascii_only=st.booleans())
def test_fast_decoder_agrees_with_the_stdlib_on_any_json(value: Any, ascii_only: bool) -> None:
    from samsara_mp.ingest import _validation as v

    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert _decide(v.decode_body, body) == _decide(v._stdlib_decode, body)
