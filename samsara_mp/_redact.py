"""Redaction of secrets (a URL's credentials, the headers' values) for logs, stats,
``publisher.json`` and error messages; ``config`` words its refusals of a URL or header with it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import SplitResult, urlsplit

__all__ = [
    "redact_url", "redact_url_safe", "redact_headers", "header_name_fault", "header_value_fault",
    "split_url", "credentials_in_path",
]

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE_CHAR_RE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")


def redact_url(url: str) -> str:
    """``url`` with any credentials (``user:password@``) replaced by ``***@``, for display."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc="***@" + host).geturl()


def redact_url_safe(url: str) -> str:
    """:func:`redact_url` for a string that may not even parse as a URL: with an
    ``@`` anywhere, everything between the scheme and its last ``@`` is hidden
    (a password holding an unencoded ``/`` or ``#`` ends the parsed netloc early)."""
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        return "(a URL holding '@')"
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The header names, each value shown as ``***``."""
    return {name: "***" for name in headers}


def split_url_setting(key: str, value: object, kind: str) -> SplitResult:
    """The URL setting ``key`` split (see :func:`split_url`), or ``InvalidConfiguration``
    naming the key when it is not a non-empty string (``kind`` says what it must be)
    or does not parse."""
    from .errors import InvalidConfiguration

    if not isinstance(value, str) or not value:
        raise InvalidConfiguration(key, f"must be {kind}")
    try:
        return split_url(value)
    except ValueError as exc:
        raise InvalidConfiguration(key, str(exc)) from None


def split_url(url: str) -> SplitResult:
    """``urlsplit(url)``, its port checked; the ``ValueError`` for a URL that does not
    parse says where or why, never what, so it can be shown with the URL's credentials in it."""
    bad = next((i for i, c in enumerate(url) if c.isspace() or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"holds a space or control character at position {bad} (percent-encode it)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        # The parser's message can quote a piece of the password ("Port could not be cast
        # to integer value as 'pa'"): not given when the URL may hold credentials.
        why = "its host or port does not parse" if "@" in url else str(exc)
        raise ValueError(f"{redact_url_safe(url)!r} is not a valid URL: {why}") from None
    return parts


def header_name_fault(name: object) -> str | None:
    """What is wrong with a header's ``name``, or None. Not echoed: a name that is not a
    token is often a whole ``Name: secret`` line."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    if not _TOKEN_RE.fullmatch(name):
        return (f"({len(name)} characters) is not a valid HTTP header name "
                "(letters, digits and !#$%&'*+.^_`|~- only)")
    return None


def header_value_fault(value: str) -> str | None:
    """What is wrong with a header's ``value``, said without quoting it (it is secret), or None.

    Past the line break or NUL, it is what requests and http.client would refuse at the
    first POST, quoting the value in the error (and stopping every batch)."""
    if any(c in value for c in "\r\n\0"):
        return "holds a line break or NUL"
    if value != value.strip():  # any blank requests' \S refuses: NBSP and NEL too
        return "begins or ends with a blank"
    if _BAD_VALUE_CHAR_RE.search(value):
        return ("holds a control character or one outside Latin-1 "
                "(an HTTP header value is visible ASCII, spaces, tabs and bytes 0x80-0xFF)")
    return None


def credentials_in_path(url: str, path: str) -> bool:
    """An ``@`` in the path that ends what reads as credentials whose unencoded ``/``
    cut the host short (``https://user:12/pw@api.example.com``): before it a ``:``,
    or after it a host name (a dot, or a port). ``https://host/@tenant/`` is a path.

    Such credentials sit where :func:`redact_url` cannot see them."""
    if "@" not in path:
        return False
    before, _, after = url.partition("://")[2].partition("@")
    host = after.split("/", 1)[0]
    return ":" in before or "." in host or ":" in host
