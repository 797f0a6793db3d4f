"""A Flask app factory that records one ``page.view`` event per request with samsara_mp."""

from __future__ import annotations

import os

from flask import Flask, request

from samsara_mp.integrations.flask import SamsaraMP

samsara = SamsaraMP()  # the extension, bound to each app by init_app


def create_app() -> Flask:
    app = Flask(__name__)
    # The same keys as SamsaraClient(...); keys left out come from SAMSARA_MP_* variables.
    app.config["SAMSARA_MP"] = {"sourceId": "flask-example", "publish_interval": 1_000}
    samsara.init_app(app)  # configures samsara_mp.get_client() for this process

    @app.get("/hello")
    def hello() -> str:
        samsara.client.record_event(eventName="page.view", path=request.path, worker=os.getpid())
        return "recorded\n"

    return app
