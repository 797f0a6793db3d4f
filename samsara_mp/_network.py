"""The HTTP connection's settings (docs/design.md, "Publishing"): the proxy and TLS keys and the
headers, checked when a config is built, and the variables requests honours (proxies, CA bundle)
read in the process that builds it, so a launched publisher gets them with the rest."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

from . import _redact
from .errors import InvalidConfiguration

__all__ = ["from_environ", "check_network", "check_headers", "CA_BUNDLE_VARIABLES"]

# The variables requests reads for a CA bundle, in its order (Session.merge_environment_settings).
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
_PROXY_SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")


def from_environ(url: str, given: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``proxy`` and ``ca_bundle`` as requests would take them from ``environ`` (this
    process's environment) for a POST to ``url``, for the keys not in ``given``.

    requests is imported only when a ``*_proxy`` variable is set: a worker that builds
    its config in an environment with no proxy does not load it."""
    found: dict[str, Any] = {}
    if given.get("proxy") is None and any(k.lower().endswith("_proxy") for k in environ):
        import requests.utils

        # requests' own selection: HTTPS_PROXY / HTTP_PROXY / ALL_PROXY by the URL's
        # scheme and host, nothing when NO_PROXY matches the host.
        proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
        if proxy:
            # requests takes "proxy.corp:3128" as http://proxy.corp:3128, and so do we.
            found["proxy"] = requests.utils.prepend_scheme_if_needed(proxy, "http")  # type: ignore[no-untyped-call]
    # Read only for an https URL: a stale CA variable must not refuse a plain-HTTP client,
    # which never uses it. An explicit verify=False ignores it, as requests does.
    if (given.get("ca_bundle") is None and given.get("verify") is not False
            and url.lower().startswith("https://")):
        for name in CA_BUNDLE_VARIABLES:
            if environ.get(name):
                found["ca_bundle"] = environ[name]
                break
    return found


def check_network(proxy: object, ca_bundle: object, client_cert: object, client_key: object,
                  verify: object) -> None:
    """``InvalidConfiguration`` naming the first bad one of the proxy and TLS keys."""
    if proxy is not None:
        _check_proxy(proxy)
    if not isinstance(verify, bool):
        raise InvalidConfiguration("verify", f"must be True or False, not {verify!r}")
    if ca_bundle is not None:
        path = _check_path("ca_bundle", ca_bundle)
        if not os.path.exists(path):  # a file, or a directory prepared by c_rehash
            raise InvalidConfiguration("ca_bundle", f"{path!r} does not exist{_from_env(path)}")
    if client_key is not None and client_cert is None:
        raise InvalidConfiguration("client_key", "is given without client_cert")
    for name, value in (("client_cert", client_cert), ("client_key", client_key)):
        if value is not None:
            path = _check_path(name, value)
            if not os.path.isfile(path):
                raise InvalidConfiguration(name, f"{path!r} is not a file")
            if not os.access(path, os.R_OK):
                raise InvalidConfiguration(name, f"{path!r} is not readable")


def _check_path(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidConfiguration(name, f"must be a non-empty path string, not {value!r}")
    return value


def _from_env(path: str) -> str:
    names = [n for n in CA_BUNDLE_VARIABLES if os.environ.get(n) == path]
    return f" (from {names[0]})" if names else ""


def _check_proxy(proxy: object) -> None:
    parts = _redact.split_url_setting("proxy", proxy, "a non-empty URL string or None")
    assert isinstance(proxy, str)
    # Without "://" a value may be a bare "user:password": it is never echoed then.
    shown = _redact.redact_url_safe(proxy) if "://" in proxy else f"({len(proxy)} characters)"
    if parts.scheme not in _PROXY_SCHEMES or not parts.hostname:
        raise InvalidConfiguration(
            "proxy", f"{shown} is not a proxy URL with a host and a scheme of {_PROXY_SCHEMES}")
    if _redact.credentials_in_path(proxy, parts.path):
        raise InvalidConfiguration(
            "proxy", f"{shown}: credentials must be percent-encoded (a password's '/' as %2F)")
    if parts.scheme.startswith("socks") and importlib.util.find_spec("socks") is None:
        raise InvalidConfiguration("proxy", "a SOCKS proxy needs PySocks: pip install 'requests[socks]'")


# Headers samsara_mp sets itself; a configured one of these would break the protocol.
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-encoding", "content-length", "accept", "host",
     "transfer-encoding", "x-samsara-publishedtimestamp"}
)


def check_headers(headers: object) -> None:
    """``InvalidConfiguration`` naming ``headers`` and the header (never its value)."""
    if headers is None:
        return
    if not isinstance(headers, Mapping):
        raise InvalidConfiguration(
            "headers", f"must be a mapping of header names to strings, not {type(headers).__name__}"
        )
    for index, (name, value) in enumerate(headers.items()):
        fault = _redact.header_name_fault(name)
        if fault is not None:
            raise InvalidConfiguration("headers", f"header #{index + 1}'s name {fault}")
        if name.lower() in _RESERVED_HEADERS:
            raise InvalidConfiguration("headers", f"{name!r} is set by samsara_mp itself")
        # The value is secret: say what is wrong with it, never what it is.
        if not isinstance(value, str):
            raise InvalidConfiguration(
                "headers", f"the value of {name!r} must be a string, not {type(value).__name__}"
            )
        fault = _redact.header_value_fault(value)
        if fault is not None:
            raise InvalidConfiguration("headers", f"the value of {name!r} {fault}")
