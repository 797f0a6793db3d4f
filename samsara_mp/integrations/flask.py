"""Flask: ``SamsaraMP(app)``, or ``SamsaraMP()`` and ``init_app(app)`` in an app factory.

``init_app`` configures the process's shared client (:func:`samsara_mp.get_client`)
from ``app.config["SAMSARA_MP"]`` (a dict of the same keys as ``SamsaraClient``,
over any defaults given to ``SamsaraMP(**config)``) and keeps it as
``app.extensions["samsara_mp"]``; views record with
``samsara_mp.get_client().record_event(...)``. The keys are exported as
``SAMSARA_MP_*`` variables, so gunicorn's forked workers (with ``--preload``
the app, and its client, are made in the master, which starts no thread)
and the reloader's child use the same settings. A bad value raises
``InvalidConfiguration`` naming the key from ``init_app``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..client import SamsaraClient, get_client
from ._settings import client_from_settings

__all__ = ["SamsaraMP", "CONFIG_KEY", "EXTENSION"]

CONFIG_KEY = "SAMSARA_MP"
EXTENSION = "samsara_mp"


class SamsaraMP:
    """The Flask extension: one process-wide client, configured from the app's config."""

    def __init__(self, app: Any = None, **config: Any) -> None:
        self.defaults = config
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> SamsaraClient:
        """Configure the process's client from ``app.config["SAMSARA_MP"]``; return it."""
        settings = app.config.get(CONFIG_KEY, {})
        if isinstance(settings, Mapping):
            settings = {**self.defaults, **settings}
        client = client_from_settings(settings, CONFIG_KEY)
        app.extensions[EXTENSION] = client
        return client

    @property
    def client(self) -> SamsaraClient:
        """The current app's client inside an app context, else the process's shared one."""
        from flask import current_app, has_app_context

        if has_app_context():
            client = current_app.extensions.get(EXTENSION)
            if isinstance(client, SamsaraClient) and not client.closed:
                return client
        return get_client()
