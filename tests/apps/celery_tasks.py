"""The Celery app that tests/test_celery.py runs as a real prefork worker.

samsara_mp settings come from the ``SAMSARA_MP_*`` environment the test gives
the worker; ``SAMSARA_TEST_*`` variables pick the broker and which parts of
the integration are on, so one module serves every scenario.
"""

from __future__ import annotations

import os

from celery import Celery  # type: ignore[import-untyped]

from samsara_mp import get_client
from samsara_mp.integrations import celery as samsara_celery

BROKER = os.environ.get("SAMSARA_TEST_BROKER", "redis://127.0.0.1:6379/0")

app = Celery("samsara_test", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_acks_late=False,
)

if os.environ.get("SAMSARA_TEST_INTEGRATION", "1") == "1":
    samsara_celery.setup(
        app,
        own_publisher=os.environ.get("SAMSARA_TEST_OWN_PUBLISHER", "1") == "1",
        ship_after_task=os.environ.get("SAMSARA_TEST_SHIP_AFTER_TASK", "1") == "1",
    )


@app.task(name="samsara_test.record_number")  # type: ignore[untyped-decorator]
def record_number(n: int) -> int:
    """Record one event carrying ``n``; return this pool process's pid."""
    get_client().record_event(eventName="celery.task", sourceId="celery", n=n)
    return os.getpid()
