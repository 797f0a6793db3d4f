"""Framework settings -> the process's shared client (Django, Flask, ASGI).

A web framework's integration reads one mapping of samsara_mp keys from the
framework's own settings, validates it once, and makes the process's shared
client from it with :func:`samsara_mp.get_client`, which also exports the keys
as ``SAMSARA_MP_*`` variables so that every child process (a preforked worker,
an autoreloader's child) builds the same configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..client import SamsaraClient, get_client
from ..config import Config
from ..errors import InvalidConfiguration

__all__ = ["client_from_settings"]

log = logging.getLogger("samsara_mp")


def client_from_settings(settings: object, name: str) -> SamsaraClient:
    """The process's shared client, configured by ``settings`` (a mapping of Config keys).

    ``name`` is how the framework spells the setting (``SAMSARA_MP``), used
    when the value is not a mapping at all. Raises ``InvalidConfiguration``
    naming the key for an unknown key or a bad value; keys left out come from
    the environment, then the defaults. Making the client starts no thread.
    """
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        kind = type(settings).__name__
        raise InvalidConfiguration(name, f"must be a dict of samsara_mp settings, not {kind}")
    config: dict[str, Any] = dict(settings)
    wanted = Config.build(**config)  # every key checked before any client exists
    client = get_client(**config)
    if client.config != wanted:
        log.warning(
            "samsara_mp: this process's client was made before %s was read; its settings keep "
            "applying (channel %s), not %s's", name, client.channel.name, name,
        )
    return client
