"""The RQ jobs that tests/test_rq.py runs in a real ``rq worker``'s work horses.

samsara_mp settings come from the ``SAMSARA_MP_*`` environment the test gives the worker.
"""

from __future__ import annotations

import os
import time

from samsara_mp import get_client


def record(job: int, count: int, then: str = "return") -> int:
    """Record ``count`` events of job ``job``; then return, raise, or outlive RQ's job timeout."""
    client = get_client()
    for n in range(count):
        client.record_event(eventName="rq.job", sourceId=f"job{job}", job=job, n=n)
    if then == "raise":
        raise RuntimeError(f"job {job} fails after recording")
    if then == "hang":
        time.sleep(600)  # RQ's death penalty (SIGALRM) ends it with JobTimeoutException
    return os.getpid()
