"""Django settings for the tests: samsara_mp's app and its SAMSARA_MP setting, nothing else.

The url and the rest come from SAMSARA_MP_* variables the test sets; sourceId
comes from here, so a test can tell that the setting reached every worker.
SMP_TEST_DJANGO_BAD names a key to set to a bad value (the ImproperlyConfigured test).
"""

from __future__ import annotations

import os

SECRET_KEY = "samsara-mp-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_site.urls"
INSTALLED_APPS = ["samsara_mp.integrations.django"]
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True

SAMSARA_MP: object = {"sourceId": "django-test"}
if os.environ.get("SMP_TEST_DJANGO_BAD") == "publish_interval":
    SAMSARA_MP = {"sourceId": "django-test", "publish_interval": -5}
elif os.environ.get("SMP_TEST_DJANGO_BAD") == "type":
    SAMSARA_MP = ["not", "a", "dict"]
