"""A segment log that cannot be written whole (a full disk) loses nothing uncounted and leaves
no torn record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from procs import tmpfs

from samsara_mp import Publisher, SamsaraClient
from samsara_mp._segment_log import SegmentLog
from samsara_mp.ingest import IngestServer


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    with tmpfs("64k") as mnt:
        yield mnt


def _final_accounting(log_path: Path) -> dict[str, int]:
    lines = [ln for ln in log_path.read_text().splitlines() if "final accounting" in ln]
    assert lines, f"no final accounting line in {log_path}"
    return dict(json.loads(lines[-1].split("final accounting ", 1)[1]))


def test_full_disk_at_shutdown_writes_what_fits_and_counts_the_rest(
    server: IngestServer, fast_config: dict[str, Any], tiny_fs: Path
) -> None:
    spool_dir = tiny_fs / "spool"
    config = dict(fast_config, shutdown_timeout=300, spool_dir=str(spool_dir))
    server.set_online(False)
    pub = Publisher(**config).start()
    try:
        with SamsaraClient(sourceId="s", start_publishing_thread=False, **config) as client:
            for seq in range(2000):
                client.record_event(eventName="lost", seq=seq, pad="x" * 40)
            assert client.ship(timeout=10)
        wait_until(lambda: pub.stats()["buffered"] == 2000, 10, "2000 buffered events")
    finally:
        code = pub.stop()
    assert code == 0
    acc = _final_accounting(pub.channel.dir / "publisher.log")
    # What fits is written whole; the rest is counted, and said at ERROR.
    assert acc["recorded"] == 2000 and acc["buffered"] == 0 and acc["delivered"] == 0
    assert acc["spooled"] + acc["dropped_spool"] == 2000 and acc["dropped_spool"] > 0
    log_text = (pub.channel.dir / "publisher.log").read_text()
    assert f"could not write {acc['dropped_spool']} undelivered events" in log_text
    assert " ERROR " in log_text
    # No torn record: a next publisher reads back exactly what was counted as written.
    log = SegmentLog(spool_dir / "outage", 1 << 20)
    log.open()
    payloads, _positions, _inherited, _ends = log.peek(10_000, 1 << 30)
    assert len(payloads) == acc["spooled"] and log.corrupt == 0
    assert [json.loads(p)["seq"] for p in payloads] == list(range(len(payloads)))
