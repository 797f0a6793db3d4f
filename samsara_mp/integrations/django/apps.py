"""The Django app config: ``settings.SAMSARA_MP`` -> the process's shared client."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]

from ...client import SamsaraClient
from ...errors import InvalidConfiguration
from .._settings import client_from_settings

__all__ = ["SamsaraMPConfig", "SETTING"]

SETTING = "SAMSARA_MP"


class SamsaraMPConfig(AppConfig):  # type: ignore[misc]
    """Makes ``samsara_mp.get_client()`` the client that ``settings.SAMSARA_MP`` describes."""

    name = "samsara_mp.integrations.django"
    label = "samsara_mp"
    verbose_name = "samsara_mp"
    default = True

    client: SamsaraClient | None = None

    def ready(self) -> None:
        try:
            self.client = client_from_settings(getattr(settings, SETTING, None), SETTING)
        except InvalidConfiguration as exc:
            where = SETTING if exc.key == SETTING else f"{SETTING}[{exc.key!r}]"
            raise ImproperlyConfigured(f"settings.{where}: {exc.reason}") from exc
