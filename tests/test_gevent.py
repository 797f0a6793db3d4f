"""gunicorn's gevent and gthread workers end to end, the master owning the publisher.

Each run starts gunicorn with 2 workers (``-k gevent``, or ``-k gthread --threads 4``)
against the reference Ingestion API, with gevent's monkey-patching done by its
worker as it starts (after samsara_mp was imported) or in the config before
samsara_mp is imported, with and without ``preload_app``. Requests come from
4 threads at once; the workers are reloaded with SIGHUP mid-run, and the master
is stopped with SIGTERM right after the last answer. ``ship_delay`` is long, so
what the workers staged is still staged when they leave: ``worker_exit`` ships it.
Every answered request's event must arrive exactly once, and the log must hold no
warning from samsara_mp (a false "could not ship all staged events" included).
With ``post_request`` each request greenlet ships while the shipper does: the two
must take turns on the link's lock, which a ``preload_app`` worker made before
gevent's worker patched (the last test shows it without gunicorn).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import wait_until
from procs import alive, children, free_port, get_pid, kill_if, stop

from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer

APPS = Path(__file__).resolve().parent / "apps"
ROOT = APPS.parent.parent
CHANNEL = "gv"
PER_PHASE = 60  # requests before and after the HUP


@pytest.mark.parametrize(
    ("worker", "preload", "patch_early", "post_request"),
    [
        ("gevent", False, False, False),
        ("gevent", True, False, False),
        ("gevent", True, False, True),
        ("gevent", False, True, False),
        ("gevent", True, True, True),
        ("gthread", False, False, False),
        ("gthread", True, False, True),
    ],
    ids=["gevent", "gevent-preload", "gevent-preload+post_request", "gevent-patched-first",
         "gevent-preload-patched-first+post_request", "gthread", "gthread-preload+post_request"],
)
def test_every_answered_request_arrives_once_through_hup_and_stop(
    worker: str, preload: bool, patch_early: bool, post_request: bool,
    server: IngestServer, runtime_dir: str, tmp_path: Path,
) -> None:
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        SAMSARA_MP_URL=server.url,
        SAMSARA_MP_CHANNEL=CHANNEL,
        SAMSARA_MP_RUNTIME_DIR=runtime_dir,
        SAMSARA_MP_PUBLISH_INTERVAL="100",
        SAMSARA_MP_MIN_BUFFER_SIZE="1",
        # Without post_request, events are still staged when a worker leaves; with it,
        # each request ships after answering while the shipper ships too.
        SAMSARA_MP_SHIP_DELAY="5" if post_request else "2000",
        SAMSARA_MP_SOURCE_ID="gevent-test",
        SMP_TEST_MARKS=str(tmp_path / "marks"),
        SMP_TEST_PATCH_EARLY="1" if patch_early else "0",
        SMP_TEST_POST_REQUEST="1" if post_request else "0",
    )
    threads = ["--threads", "4"] if worker == "gthread" else []
    args = [
        sys.executable, "-m", "gunicorn", "-c", str(APPS / "gevent_conf.py"),
        "--chdir", str(APPS), "--bind", f"127.0.0.1:{port}",
        "-k", worker, "--workers", "2", *threads,
        *(["--preload"] if preload else []), "gunicorn_app:app",
    ]
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        master = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    channel = Channel(Config.build(env={}, url=server.url, channel=CHANNEL, runtime_dir=runtime_dir))
    seen: set[int] = set()
    publisher_pid: int | None = None
    base = f"http://127.0.0.1:{port}/"
    local = threading.local()
    answered: dict[int, int] = {}  # request id -> pid of the worker that answered

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.headers["Connection"] = "close"  # a kept connection holds a worker
        return local.session  # type: ignore[no-any-return]

    def send(rid: int) -> int | None:
        pid = get_pid(session(), f"{base}?rid={rid}")
        if pid is not None:
            answered[rid] = pid
        return pid

    try:
        wait_until(lambda: master.poll() is not None or get_pid(session(), base),
                   30, "gunicorn to answer")
        assert master.poll() is None, log_path.read_text()
        info = wait_until(channel.read_info, 10, "publisher.json")
        publisher_pid = int(info["pid"])
        assert info["owner_pid"] == master.pid, "the master owns the publisher"

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, range(PER_PHASE)))
            before_hup = children(master.pid) - {publisher_pid}
            seen |= before_hup
            os.kill(master.pid, signal.SIGHUP)
            rid = PER_PHASE
            deadline = time.monotonic() + 20
            while not set(answered.values()) - before_hup:
                assert rid < 10 * PER_PHASE and time.monotonic() < deadline, (
                    "no worker forked after SIGHUP answered")
                send(rid)
                rid += 1
            seen |= children(master.pid)
            list(pool.map(send, range(rid, rid + PER_PHASE)))
            sent = rid + PER_PHASE
        seen |= children(master.pid)
        assert len(answered) >= 0.95 * sent, (sent, len(answered))

        master.send_signal(signal.SIGTERM)
        assert master.wait(60) == 0, log_path.read_text()
        wait_until(lambda: not alive(publisher_pid), 10, "the publisher to stop with the master")
    finally:
        seen |= children(master.pid)
        stop(master, signal.SIGTERM, grace=30)
        for pid in seen:
            kill_if(pid, "gunicorn")
        if publisher_pid is not None:
            kill_if(publisher_pid, "samsara_mp.publisher")

    text = log_path.read_text()
    assert not [pid for pid in seen if alive(pid)], "workers left running"
    assert set(answered.values()) - before_hup, "SIGHUP replaced the workers"
    complaints = [line for line in text.splitlines()
                  if re.search(r"WARNING|ERROR|Traceback|samsara_mp: (?!publisher \d+ serves|stopping)",
                               line)]
    assert not complaints, text[-4000:]

    events = [e for e in server.events() if e["eventName"] == "test.request"]
    rids = Counter(e["rid"] for e in events)
    duplicated = {rid: n for rid, n in rids.items() if n > 1}
    assert not duplicated, f"events delivered more than once: {duplicated}"
    missing = sorted(set(answered) - set(rids))
    assert not missing, f"answered requests whose event never arrived: {missing}"
    assert set(rids) <= set(range(sent))
    assert all(e["pid"] == answered[e["rid"]] for e in events if e["rid"] in answered)


# The lock the link is made with at the fork, before gevent's worker patches:
# one greenlet holds it across a cooperative wait, another waits for it.
_TAKE_TURNS = """
import sys, time
from samsara_mp._link import Link
from samsara_mp.channel import Channel
from samsara_mp.config import Config

config = Config.build(env={}, url="http://127.0.0.1:9/", runtime_dir=sys.argv[1], channel="gv")
link = Link(config, Channel(config))
link.after_fork()  # what a preload_app worker's fork does, before the worker patches

from gevent import monkey

monkey.patch_all()
import gevent

ran = []

def holder():
    assert link.enter(0.0)
    gevent.sleep(0.2)  # a push waiting for its answer on a cooperative socket
    ran.append("holder")
    link.leave()

gevent.spawn(holder)
gevent.sleep(0)
assert not link.reentered(), "another greenlet holds it: not a re-entry"
start = time.monotonic()
got = link.enter(3.0)
print(got, round(time.monotonic() - start, 2), ran)
"""


def test_greenlets_take_turns_on_a_link_made_before_monkey_patching(runtime_dir: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _TAKE_TURNS, runtime_dir], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    got, waited, ran = proc.stdout.split(" ", 2)
    # A native lock blocked the whole process, the holder included, for the whole timeout.
    assert (got, ran.strip()) == ("True", "['holder']"), proc.stdout
    assert float(waited) < 2.0, proc.stdout
