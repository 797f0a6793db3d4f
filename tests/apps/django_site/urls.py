"""One view: records a ``test.request`` event for ``?rid=N`` and answers the worker's pid."""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse
from django.urls import path

from samsara_mp import get_client


def record(request: HttpRequest) -> HttpResponse:
    rid = request.GET.get("rid")
    if rid is not None:
        get_client().record_event(eventName="test.request", rid=int(rid), pid=os.getpid())
    return HttpResponse(str(os.getpid()), content_type="text/plain")


urlpatterns = [path("", record)]
