"""Django settings: samsara_mp's app in INSTALLED_APPS, configured by SAMSARA_MP."""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "mysite.urls"
DATABASES: dict[str, object] = {}
USE_TZ = True

INSTALLED_APPS = [
    "samsara_mp.integrations.django",  # its ready() configures samsara_mp.get_client()
]

# The same keys as SamsaraClient(...); keys left out come from SAMSARA_MP_* variables.
SAMSARA_MP = {
    "url": os.environ.get("SAMSARA_MP_URL", "http://127.0.0.1:9000"),
    "sourceId": "django-example",
    "publish_interval": 1_000,
}
