"""samsara_mp: one shared, bounded event buffer and one publisher for every process.

Workers of a preforked app (gunicorn, uWSGI, Celery prefork, multiprocessing)
record events with :class:`SamsaraClient`; a single publisher process per
channel batches, compresses, retries and POSTs them to the Samsara Ingestion API.
"""

from __future__ import annotations

import logging

from .client import SamsaraClient, close_all, get_client, reset_after_fork, ship_all
from .config import Config
from .errors import (
    ChannelError,
    ChannelTaken,
    InvalidConfiguration,
    InvalidEvent,
    PublishError,
    SamsaraError,
)
from .helpers import current_time_millis
from .publisher import Publisher

__all__ = [
    "SamsaraClient",
    "Publisher",
    "Config",
    "SamsaraError",
    "InvalidEvent",
    "InvalidConfiguration",
    "PublishError",
    "ChannelError",
    "ChannelTaken",
    "current_time_millis",
    "get_client",
    "ship_all",
    "close_all",
    "reset_after_fork",
]

__version__ = "0.1.0"

logging.getLogger("samsara_mp").addHandler(logging.NullHandler())
