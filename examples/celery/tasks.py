"""A Celery app whose tasks record analytics events through samsara_mp.

The worker's main process owns the channel's publisher; every prefork child
records with ``get_client()`` and ships before it is recycled or stopped.

Run a worker (settings come from ``SAMSARA_MP_*`` variables)::

    SAMSARA_MP_URL=http://127.0.0.1:9000 celery -A tasks worker --max-tasks-per-child=100

and queue some work, waiting for it: ``python tasks.py 20``.
"""

from __future__ import annotations

import os
import sys

from celery import Celery  # type: ignore[import-untyped]

from samsara_mp import get_client
from samsara_mp.integrations.celery import setup

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

# The main name matches the module, so `python tasks.py` sends the names the worker knows.
app = Celery("tasks", broker=BROKER, backend=BROKER)
app.conf.broker_connection_retry_on_startup = True

# Connects the worker signals; url and the rest come from the environment here.
setup(app, sourceId="celery-example")


@app.task  # type: ignore[untyped-decorator]
def resize_image(image_id: str, width: int) -> str:
    """Pretend to resize an image, and record that it happened."""
    get_client().record_event(eventName="image.resized", image_id=image_id, width=width)
    return image_id


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    results = [resize_image.delay(f"img-{i}", 640) for i in range(count)]
    done = [r.get(timeout=60) for r in results]
    print(f"{len(done)} images resized")
