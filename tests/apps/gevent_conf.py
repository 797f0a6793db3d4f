"""gunicorn config for tests/test_gevent.py: tests/apps/gunicorn_conf.py, optionally after
``gevent.monkey.patch_all()``.

SMP_TEST_PATCH_EARLY=1 patches here, before samsara_mp is imported (the recipe for
a gevent app loaded with ``preload_app``); without it, gevent's worker patches as
it starts, after samsara_mp was imported in the master. The worker class and the
number of workers and threads come from the command line.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

if os.environ.get("SMP_TEST_PATCH_EARLY") == "1":
    from gevent import monkey

    monkey.patch_all()

globals().update(
    {k: v for k, v in runpy.run_path(str(Path(__file__).with_name("gunicorn_conf.py"))).items()
     if not k.startswith("__")}
)
del globals()["worker_class"], globals()["workers"]  # from the command line
