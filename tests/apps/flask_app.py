"""Flask app for tests/test_frameworks.py, built by an app factory with SamsaraMP.init_app.

One event per ``?rid=N`` request; answers the worker's pid. With gunicorn's
``--preload`` the app (and the process's client) is made in the master.
"""

from __future__ import annotations

import os

from flask import Flask, request

from samsara_mp.integrations.flask import SamsaraMP

samsara = SamsaraMP()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SAMSARA_MP"] = {"sourceId": "flask-test"}  # the url comes from SAMSARA_MP_URL
    samsara.init_app(app)

    @app.get("/")
    def record() -> str:
        rid = request.args.get("rid")
        if rid is not None:
            samsara.client.record_event(eventName="test.request", rid=int(rid), pid=os.getpid())
        return str(os.getpid())

    return app


app = create_app()
