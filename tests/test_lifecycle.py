"""Election, re-election, fork safety and channel security with real processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from samsara_mp import ChannelError, ChannelTaken, Publisher, SamsaraClient
from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer


def _race_worker(config: dict[str, Any], worker: int, barrier: Any, out: Any) -> None:
    barrier.wait(30)
    client = SamsaraClient(sourceId=f"w{worker}", **config)
    client.record_event(eventName="race", worker=worker)
    ok = client.flush(timeout=30)
    stats = client.stats()["channel"]
    out.put((worker, ok, stats["publisher_pid"] if stats else None))
    client.close()


def test_twenty_processes_racing_elect_exactly_one_publisher(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(20)
    out = ctx.Queue()
    config = dict(fast_config, idle_timeout=2_000)
    procs = [ctx.Process(target=_race_worker, args=(config, w, barrier, out)) for w in range(20)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert all(ok for _, ok, _ in results), results
    pids = {pid for _, _, pid in results}
    assert len(pids) == 1, f"more than one publisher: {pids}"
    assert server.wait_for_events(20, 10)
    assert sorted(e["worker"] for e in server.events()) == list(range(20))
    log = Channel(Config.build(**config)).dir / "publisher.log"
    assert log.read_text().count("serving channel") == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_second_owner_handle_is_told_who_serves_and_owns_nothing(
    publisher: Publisher, fast_config: dict[str, Any]
) -> None:
    second = Publisher(**fast_config)
    with pytest.raises(ChannelTaken) as info:
        second.start(timeout=10)
    assert info.value.pid == publisher.pid is not None
    assert second.pid is None and second.stop() is None  # it stops nothing
    assert publisher.stats()["publisher_pid"] == publisher.pid  # the first still serves


def test_a_lock_held_by_a_publisher_that_never_answers_is_a_start_failure_not_taken(
    fast_config: dict[str, Any]
) -> None:
    holder = Publisher(**fast_config)
    holder.channel.ensure_dir()
    lock = holder.channel.try_lock()  # this test holds the election lock and serves nothing
    assert lock is not None
    try:
        with pytest.raises(ChannelError) as info:
            Publisher(**fast_config).start(timeout=3)
        assert not isinstance(info.value, ChannelTaken), info.value
        assert "does not answer" in str(info.value)
    finally:
        lock.release()


def test_publisher_sigkill_leads_to_reelection_and_delivery_continues(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    client = SamsaraClient(sourceId="s", idle_timeout=2_000, **fast_config)
    try:
        for seq in range(100):
            client.record_event(eventName="before", seq=seq)
        assert client.flush(timeout=30)
        first = client.stats()["channel"]["publisher_pid"]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not _alive(first) or _zombie(first), 10, "publisher to die")
        for seq in range(100):
            client.record_event(eventName="after", seq=seq)
        # The shipper finds the publisher gone, the lock free, and starts another.
        second = wait_until(
            lambda: (s := client.stats()["channel"]) and s["publisher_pid"] != first and s["publisher_pid"],
            10, "a new publisher",
        )
        assert client.flush(timeout=30)
        assert second != first
    finally:
        client.close()
    assert server.wait_for_events(200, 10)
    after = [e["seq"] for e in server.events() if e["eventName"] == "after"]
    assert after == list(range(100))


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def _fork_child(client: SamsaraClient, worker: int) -> None:
    for seq in range(50):
        client.record_event(eventName="child", worker=worker, seq=seq)


def test_client_created_before_fork_works_in_children_without_duplicating(
    server: IngestServer, fast_config: dict[str, Any]
) -> None:
    from samsara_mp import Publisher

    with Publisher(**fast_config) as pub:
        # A long ship delay keeps the parent's events staged across the fork.
        client = SamsaraClient(sourceId="p", start_publishing_thread=False, ship_delay=60_000,
                               ship_batch=10_000, **fast_config)
        for seq in range(30):
            client.record_event(eventName="parent", seq=seq)
        assert client.stats()["local"]["staged"] == 30
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_fork_child, args=(client, w)) for w in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        assert client.close(timeout=10)
        assert server.wait_for_events(30 + 150, 20)
        wait_until(lambda: pub.stats()["buffered"] == 0, 10, "empty buffer")
    events = server.events()
    assert [e["seq"] for e in events if e["eventName"] == "parent"] == list(range(30))
    for w in range(3):
        assert [e["seq"] for e in events if e.get("worker") == w] == list(range(50))


# ---- security ----

def _channel(runtime_dir: str, name: str = "sec") -> Channel:
    return Channel(Config.build(env={}, url="http://127.0.0.1:9", runtime_dir=runtime_dir, channel=name))


def test_runtime_directory_socket_and_authkey_are_private(
    publisher: Any, runtime_dir: str
) -> None:
    ch = publisher.channel
    assert stat.S_IMODE(os.lstat(ch.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(ch.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(ch.authkey_path).st_mode) == 0o600
    assert len(ch.authkey_path.read_bytes()) == 32


def test_symlinked_runtime_directory_is_refused(runtime_dir: str) -> None:
    target = os.path.join(runtime_dir, "elsewhere")
    os.mkdir(target, 0o700)
    os.symlink(target, os.path.join(runtime_dir, "sec"))
    with pytest.raises(ChannelError, match="symlink"):
        _channel(runtime_dir).ensure_dir()


def test_group_or_world_open_runtime_directory_is_refused(runtime_dir: str) -> None:
    os.mkdir(os.path.join(runtime_dir, "sec"))
    os.chmod(os.path.join(runtime_dir, "sec"), 0o770)
    with pytest.raises(ChannelError, match="0700"):
        _channel(runtime_dir).ensure_dir()


def _nobody() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


@needs_root
def test_runtime_directory_owned_by_another_user_is_refused(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "sec")
    os.mkdir(path, 0o700)
    os.chown(path, *_nobody())
    # It says how to get out of it: a runtime_dir of one's own.
    with pytest.raises(ChannelError, match="owned by uid .*SAMSARA_MP_RUNTIME_DIR"):
        _channel(runtime_dir).ensure_dir()


_INTRUDER = r"""
import sys
from pathlib import Path
from multiprocessing.connection import Client
path, key_path = sys.argv[1], sys.argv[2]
try:
    open(key_path, "rb").read()
    print("read-authkey")
except OSError:
    print("authkey-denied")
try:
    Client(path, authkey=b"x" * 32)
    print("connected")
except OSError:
    print("connect-denied")
"""


@needs_root
def test_another_uid_can_neither_read_the_authkey_nor_connect(publisher: Any, runtime_dir: str) -> None:
    uid, gid = _nobody()
    os.chmod(runtime_dir, 0o755)  # let the intruder reach the channel directory's parent
    ch = publisher.channel
    # The intruder needs an interpreter it may execute: the system's, not a venv under /root.
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    proc = subprocess.run(
        [python, "-I", "-c", _INTRUDER, ch.socket_path, str(ch.authkey_path)],
        user=uid, group=gid, extra_groups=[], capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert proc.stdout.split() == ["authkey-denied", "connect-denied"], proc.stderr
    stats = publisher.stats()
    assert stats["recorded"] == 0


def test_a_publisher_that_cannot_start_tells_its_launcher_why(
    server: Any, fast_config: dict[str, Any], runtime_dir: str
) -> None:
    # Its spool directory is open to others: the publisher refuses it and exits; the
    # reason reaches Publisher.start()'s error through the channel's status file.
    spool = Path(runtime_dir) / "open-spool"
    spool.mkdir()
    os.chmod(spool, 0o777)
    pub = Publisher(**dict(fast_config, spool_dir=str(spool)))
    with pytest.raises(ChannelError) as info:
        pub.start(timeout=15)
    assert "spool directory" in str(info.value) and "0700" in str(info.value)
    assert pub.channel.last_failure() is not None
    # A publisher that then serves clears it.
    with Publisher(**fast_config) as ok:
        assert ok.channel.last_failure() is None
