"""samsara_mp: one shared, bounded event buffer and one publisher for every process.

Workers of a preforked app (gunicorn, uWSGI, Celery prefork, multiprocessing)
record events with :class:`SamsaraClient`; a single publisher process per
channel batches, compresses, retries and POSTs them to the Samsara Ingestion API.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Loaded on first use (PEP 562): the publisher process imports only what it
# needs before it serves, and a worker that only records never loads requests.
_EXPORTS = {
    "SamsaraClient": "client", "get_client": "client", "ship_all": "client",
    "close_all": "client", "reset_after_fork": "client", "Publisher": "publisher",
    "Config": "config", "current_time_millis": "helpers",
    "SamsaraError": "errors", "InvalidEvent": "errors", "InvalidConfiguration": "errors",
    "PublishError": "errors", "ChannelError": "errors", "ChannelTaken": "errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'samsara_mp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
