"""One view that records a ``page.view`` event per request."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path

from samsara_mp import get_client


def hello(request: HttpRequest) -> HttpResponse:
    get_client().record_event(eventName="page.view", path=request.path)
    return HttpResponse("recorded\n", content_type="text/plain")


urlpatterns = [path("", hello), path("hello", hello)]
