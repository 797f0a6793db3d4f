"""overflow="spool": an outage longer than the shared buffer rides out on disk (issue #15).

Real publisher processes, the real reference server taken offline and back,
real worker processes; the spool's files are damaged by hand where a test
says so. The record format read here is the documented one:
``<length u32 LE><crc32 u32 LE><payload>``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import struct
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from procs import tmpfs
from workers import record_many

from samsara_mp import Publisher, SamsaraClient
from samsara_mp._segment_log import SegmentLog
from samsara_mp.cli.format import format_stats
from samsara_mp.config import Config
from samsara_mp.errors import InvalidConfiguration
from samsara_mp.ingest import IngestServer
from samsara_mp.ring import Ring

FRAME = struct.Struct("<II")


def _invariant(s: dict[str, Any]) -> int:
    """recorded minus every way out and every place an event can be: 0 when balanced."""
    return s["recorded"] - (
        s["delivered"] + s["dropped_overflow"] + s["rejected"] + s["buffered"]
        + s["spool_pending"] + s["dropped_spool"]
    )


def _spool_config(fast_config: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**fast_config, "overflow": "spool", "max_buffer_size": 5_000, "backoff_cap": 200,
            **changes}


def _by_source(server: IngestServer) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for e in server.events():
        if e["eventName"] == "test.event":
            seqs[e["sourceId"]].append(e["seq"])
    return seqs


def _segments(pub: Publisher) -> list[Path]:
    return sorted((pub.channel.dir / "spool" / "outage").glob("seg-*.smp"))


def _records(path: Path) -> list[tuple[int, int]]:
    """(end offset, seq) of each whole, valid record of a segment."""
    data = path.read_bytes()
    out, off = [], 0
    while off + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, off)
        payload = data[off + FRAME.size:off + FRAME.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        off += FRAME.size + length
        out.append((off, json.loads(payload)["seq"]))
    return out


def _kill(pub: Publisher) -> None:
    assert pub.pid is not None and pub._proc is not None
    os.kill(pub.pid, signal.SIGKILL)
    pub._proc.wait(10)


def _record(client: SamsaraClient, start: int, count: int, pad: str = "") -> None:
    for seq in range(start, start + count):
        client.record_event(eventName="test.event", seq=seq, pad=pad)


def test_30000_events_from_7_workers_ride_out_an_outage_once_and_in_order(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = _spool_config(fast_config)
    counts = [30_000 // 7 + (1 if w < 30_000 % 7 else 0) for w in range(7)]
    assert sum(counts) == 30_000
    server.set_online(False)
    with Publisher(**config) as pub:
        ctx = multiprocessing.get_context("fork")
        workers = [ctx.Process(target=record_many, args=(config, w, n)) for w, n in enumerate(counts)]
        for p in workers:
            p.start()
        try:
            for p in workers:
                p.join(60)
                assert p.exitcode == 0, p.exitcode
        finally:
            for p in workers:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        during = wait_until(lambda: (s := pub.stats())["recorded"] == 30_000 and s, 20,
                            "30000 events recorded")
        assert during["buffered"] == 5_000 and during["spooled"] == 25_000
        assert during["spool_pending"] == 25_000 and during["spool_bytes"] > 25_000 * 50
        assert during["dropped_overflow"] == 0 and during["dropped_spool"] == 0
        assert server.event_count() == 0 and _invariant(during) == 0
        assert "25,000 events" in format_stats(during)  # samsara-mp status shows the spool
        server.set_online(True)
        after = wait_until(
            lambda: (s := pub.stats())["delivered"] == 30_000 and s["spool_pending"] == 0 and s,
            30, "everything delivered")
        assert after["restored"] == 25_000 and after["buffered"] == 0 and _invariant(after) == 0
        assert not _segments(pub)  # delivered: nothing left on disk for a next publisher
    seqs = _by_source(server)
    assert sorted(seqs) == [f"w{w}" for w in range(7)]
    for w, n in enumerate(counts):
        assert seqs[f"w{w}"] == list(range(n)), f"w{w} out of order or not once"


def _recorded_and_waiting(pub: Publisher, n: int) -> dict[str, Any]:
    """``pub``'s stats once it recorded ``n`` and waits out the injected 503's Retry-After."""
    return wait_until(
        lambda: (s := pub.stats())["recorded"] == n and s["failed_attempts"] == 1
        and s["backoff_until"] and s, 10, f"{n} recorded and the publisher waiting out Retry-After")


def test_a_publisher_killed_mid_outage_loses_only_what_it_held_in_memory(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = _spool_config(fast_config, max_buffer_size=2_000)
    server.set_online(False)
    # The first try is answered 503 with a long Retry-After, and the kill waits for that
    # answer: the killed publisher then has no POST in flight, which the server could
    # still take once it is back online (and the second publisher would rightly resend).
    server.inject(status=503, count=1, retry_after="60")
    first = Publisher(**config).start()
    try:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 0, 12_000)
            assert client.ship(timeout=20)
        held = _recorded_and_waiting(first, 12_000)
        assert held["buffered"] == 2_000 and held["spooled"] == 10_000
    finally:
        _kill(first)
    assert first.stop() == -signal.SIGKILL
    server.set_online(True)
    with Publisher(**config) as second:
        stats = wait_until(lambda: (s := second.stats())["delivered"] == 10_000
                           and s["spool_pending"] == 0 and s, 30, "the spool delivered")
        assert not _segments(second)
    # The 2000 newest were in the killed one's memory; everything it had spooled arrives.
    assert _by_source(server)["s"] == list(range(10_000))
    assert stats["restored"] == 10_000 and stats["spool_inherited"] == 10_000
    assert stats["recorded"] == 10_000 and _invariant(stats) == 0


def test_a_torn_tail_and_a_corrupt_record_are_skipped_with_a_count_and_the_rest_delivered(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # A 1.5 MiB bound: 192 KiB segments, so 7000 spooled events of ~140 bytes make several.
    config = _spool_config(fast_config, max_buffer_size=1_000, spool_max_bytes=3 << 19)
    server.set_online(False)
    server.inject(status=503, count=1, retry_after="60")  # no POST in flight at the kill
    first = Publisher(**config).start()
    try:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 0, 8_000, pad="x" * 60)
            assert client.ship(timeout=20)
        held = _recorded_and_waiting(first, 8_000)
        assert held["spooled"] == 7_000 and held["dropped_spool"] == 0, held
    finally:
        _kill(first)
    first.stop()
    segs = _segments(first)
    assert len(segs) >= 4, segs
    records = {p: _records(p) for p in segs}
    assert sum(map(len, records.values())) == 7_000
    # A flipped byte in the middle of the second segment, and a tail torn mid-record
    # (what a publisher killed during a write leaves) in the last one.
    mid = records[segs[1]][len(records[segs[1]]) // 2]
    data = bytearray(segs[1].read_bytes())
    data[mid[0] + FRAME.size + 3] ^= 0xFF  # inside the payload of the record after `mid`
    segs[1].write_bytes(bytes(data))
    last = records[segs[-1]]
    tail = segs[-1].read_bytes()
    segs[-1].write_bytes(tail[:last[-2][0] + 5])  # the last whole record is the one before
    expected = []
    for p in segs:
        for end, seq in records[p]:
            if p == segs[1] and end > mid[0]:
                break
            if p == segs[-1] and end > last[-2][0]:
                break
            expected.append(seq)
    server.set_online(True)
    with Publisher(**config) as second:
        stats = wait_until(lambda: (s := second.stats())["spool_pending"] == 0
                           and s["delivered"] == len(expected) and s, 30, "the spool delivered")
    assert _by_source(server)["s"] == expected
    assert stats["spool_corrupt"] == 2 and stats["spool_corrupt_bytes"] > 0
    assert _invariant(stats) == 0
    log_text = (second.channel.dir / "publisher.log").read_text()
    assert log_text.count("is torn or corrupt at byte") == 2


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    with tmpfs("256k") as mnt:
        yield mnt


def test_a_full_disk_falls_back_to_drop_oldest_counted_and_logged(
    server: IngestServer, fast_config: dict[str, Any], tiny_fs: Path
) -> None:
    config = _spool_config(fast_config, max_buffer_size=1_000, spool_dir=str(tiny_fs / "spool"))
    server.set_online(False)
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            for start in range(0, 10_000, 1_000):  # ~1.4 MB of events for a 256 KiB disk
                _record(client, start, 1_000, pad="x" * 100)
                assert client.ship(timeout=20)  # never a hang
            stats = wait_until(lambda: (s := pub.stats())["recorded"] == 10_000 and s, 10,
                               "10000 recorded")
        assert stats["spool_errors"] >= 1 and stats["dropped_spool"] > 0
        assert stats["spooled"] > 0 and stats["dropped_overflow"] == 0
        assert _invariant(stats) == 0
        server.set_online(True)
        stats = wait_until(lambda: (s := pub.stats())["spool_pending"] == 0
                           and s["buffered"] == 0 and s, 30, "spool and buffer delivered")
    seqs = _by_source(server)["s"]
    assert seqs == sorted(set(seqs)) and seqs[-1] == 9_999
    assert len(seqs) == stats["delivered"] == 10_000 - stats["dropped_spool"]
    assert _invariant(stats) == 0
    log_text = (pub.channel.dir / "publisher.log").read_text()
    assert " ERROR samsara_mp: cannot write the outage spool" in log_text
    assert "No space left on device" in log_text


def test_past_spool_max_bytes_the_oldest_segments_are_dropped_and_counted(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    config = _spool_config(fast_config, max_buffer_size=1_000, spool_max_bytes=256 * 1024)
    server.set_online(False)
    with Publisher(**config) as pub:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            _record(client, 0, 10_000, pad="x" * 100)
            assert client.ship(timeout=20)
        held = wait_until(lambda: (s := pub.stats())["recorded"] == 10_000 and s, 10,
                          "10000 recorded")
        assert held["spool_bytes"] <= 256 * 1024 and held["dropped_spool"] > 0
        assert held["spool_pending"] > 1_000  # the newest that fit the bound are on disk
        assert held["spool_errors"] == 0 and _invariant(held) == 0
        server.set_online(True)
        stats = wait_until(lambda: (s := pub.stats())["spool_pending"] == 0
                           and s["buffered"] == 0 and s, 30, "spool and buffer delivered")
    seqs = _by_source(server)["s"]
    # The oldest went: what arrives is once and in order: the batch that was in flight when
    # the outage began (never dropped), then everything that was on disk or in memory.
    flight = held["in_flight"]
    kept = held["spool_pending"] + held["buffered"] - flight
    assert seqs == sorted(set(seqs)) and seqs[:flight] == list(range(flight))
    assert seqs[flight:] == list(range(10_000 - kept, 10_000))
    assert len(seqs) == 10_000 - stats["dropped_spool"] and _invariant(stats) == 0


def test_overflow_and_spool_max_bytes_are_validated_by_name() -> None:
    assert Config.build(url="http://x", env={}).overflow == "drop"  # the default stays drop-oldest
    assert Config.build(url="http://x", env={}).spool_max_bytes == 1 << 30
    for key, value in (("overflow", "disk"), ("spool_max_bytes", 100), ("spool_max_bytes", "1G")):
        with pytest.raises(InvalidConfiguration) as info:
            Config.build(url="http://x", env={}, **{key: value})
        assert info.value.key == key


def test_a_next_publisher_resumes_after_what_was_delivered_and_events_in_flight_are_not_resent(
    tmp_path: Path,
) -> None:
    """The spool and the ring in this process, on real files: the cursor saved at each
    delivery lets a restart skip what was delivered; a batch in flight stays in flight
    while overflow moves what waits behind it to disk, and is sent first."""
    def events(a: int, b: int) -> list[bytes]:
        return [json.dumps({"seq": i}).encode() for i in range(a, b)]

    def seqs(payloads: list[bytes]) -> list[int]:
        return [json.loads(p)["seq"] for p in payloads]

    spool = SegmentLog(tmp_path / "outage", 1 << 20)
    spool.open()
    buf = Ring(100, spool=spool, overflow="spool")
    buf.push(events(0, 100))
    in_flight = buf.take(50, 1 << 20)  # 0..49 sent...
    assert in_flight is not None
    buf.push(events(100, 1_100))  # ...while overflow moves 0..49 (first) and 50..1049 to disk
    buf.settle(in_flight, range(50), [])
    got = seqs(in_flight.payloads)
    batch = buf.take(300, 1 << 20)
    assert batch is not None and seqs(batch.payloads)[0] == 50  # the disk's oldest, next
    buf.settle(batch, range(len(batch.payloads)), [])
    got += seqs(batch.payloads)
    s = buf.snapshot()
    assert _invariant({**s}) == 0 and s["spooled"] == 1_050 and s["restored"] == 350
    in_ring = list(buf._ring)
    buf.close_spool()
    # A next publisher (a new spool on the same directory) starts after what was delivered.
    again = SegmentLog(tmp_path / "outage", 1 << 20)
    again.open()
    buf2 = Ring(100, spool=again, overflow="spool")
    while buf2.spool_pending():
        batch = buf2.take(300, 1 << 20)
        assert batch is not None
        buf2.settle(batch, range(len(batch.payloads)), [])
        got += seqs(batch.payloads)
    assert got + seqs(in_ring) == list(range(1_100))
    s = buf2.snapshot()
    assert s["spool_inherited"] == s["restored"] == s["recorded"] == 700 and _invariant(s) == 0
    assert not list((tmp_path / "outage").glob("seg-*"))


def test_a_flush_after_the_publisher_died_mid_outage_elects_one_and_waits_for_the_disk(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    # No owner: the client elects the publisher. It is SIGKILLed during an outage with
    # 25,000 events on disk and 5,000 in memory; the API comes back; no new event is
    # recorded. One flush elects a new publisher and returns only once everything that
    # was on disk is delivered; it says False, since what was in memory is lost.
    config = _spool_config(fast_config, max_buffer_size=5_000)
    server.set_online(False)
    client = SamsaraClient(sourceId="s", **config)
    try:
        _record(client, 0, 30_000)
        assert client.ship(timeout=30)
        held = wait_until(lambda: (s := client.stats()["channel"])["spool_pending"] == 25_000 and s,
                          20, "25,000 on disk")
        assert held["buffered"] == 5_000
        pid = client.channel.read_info()["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _running(pid), 10, "the publisher to die")
        server.set_online(True)
        assert client.flush(timeout=40) is False  # 5,000 went with the dead publisher's memory
        seqs = _by_source(server)["s"]
        # Everything that was on disk arrived once, in order, before the flush returned.
        assert len(seqs) == 25_000 and seqs == sorted(set(seqs))
        assert client.channel.read_info()["pid"] != pid
    finally:
        client.close()


def _running(pid: int) -> bool:
    from samsara_mp._procfs import process_running

    return process_running(pid, None)
