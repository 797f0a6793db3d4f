"""A process tree of workers that never start a publisher: ``start_publishing_thread=False``.

``python separate_workers.py WORKERS EVENTS MARKS``: forks WORKERS processes;
each records EVENTS ``test.sidecar`` events, appends its pid to MARKS, then
waits (``flush``, bounded) for a publisher that another process tree runs
(``samsara-mp publisher``) to take and send them. Exits 0 when every worker's
flush succeeded. Settings come from SAMSARA_MP_* variables.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from samsara_mp import SamsaraClient


def work(index: int, events: int, marks: str) -> None:
    client = SamsaraClient(start_publishing_thread=False, sourceId=f"sidecar-{index}")
    for seq in range(events):
        client.record_event(eventName="test.sidecar", worker=index, seq=seq)
    with open(marks, "a") as f:
        f.write(f"{os.getpid()}\n")
    ok = client.flush(timeout=60)
    client.close()
    sys.exit(0 if ok else 1)


def main() -> int:
    workers, events, marks = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=work, args=(i, events, marks)) for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(90)
    codes = [proc.exitcode for proc in procs]
    print("exit codes", codes, flush=True)
    return 0 if codes == [0] * workers else 1


if __name__ == "__main__":
    sys.exit(main())
