"""A spool that cannot be written (a full disk) loses nothing uncounted and leaves no debris."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from procs import tmpfs

from samsara_mp import Publisher, SamsaraClient
from samsara_mp.ingest import IngestServer


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    with tmpfs("64k") as mnt:
        yield mnt


def _final_accounting(log_path: Path) -> dict[str, int]:
    lines = [ln for ln in log_path.read_text().splitlines() if "final accounting" in ln]
    assert lines, f"no final accounting line in {log_path}"
    return dict(json.loads(lines[-1].split("final accounting ", 1)[1]))


def test_full_disk_at_shutdown_counts_the_events_and_leaves_no_file(
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
    log_text = (pub.channel.dir / "publisher.log").read_text()
    assert "could not spool 2000 undelivered events" in log_text and " ERROR " in log_text
    acc = _final_accounting(pub.channel.dir / "publisher.log")
    assert acc["recorded"] == 2000 and acc["dropped_spool"] == 2000 and acc["spooled"] == 0
    assert acc["recorded"] == (acc["delivered"] + acc["dropped_overflow"] + acc["rejected"]
                               + acc["buffered"] + acc["spooled"] + acc["dropped_spool"])
    assert not list(spool_dir.iterdir()), list(spool_dir.iterdir())


def test_next_publisher_removes_what_a_failed_writer_left(
    server: IngestServer, fast_config: dict[str, Any], runtime_dir: str
) -> None:
    spool_dir = Path(runtime_dir) / "myspool"
    spool_dir.mkdir(mode=0o700)
    (spool_dir / ".spool-1-2.jsonl").write_bytes(b'{"eventName":"half')  # a killed writer's temp
    (spool_dir / "spool-3-4.jsonl").write_bytes(b"")  # an older version's failed write
    config = dict(fast_config, spool_dir=str(spool_dir))
    with Publisher(**config) as pub:
        stats = pub.stats()
    assert stats["restored"] == 0
    assert not list(spool_dir.iterdir()), list(spool_dir.iterdir())
