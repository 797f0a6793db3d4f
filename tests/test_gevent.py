"""gevent: a client made before monkey-patching works in greenlets.

gevent's gunicorn worker patches after the fork, so a client made before it
(``preload_app``) was reset at the fork with native locks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
