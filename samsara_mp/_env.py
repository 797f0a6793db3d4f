"""Settings as text for other processes: ``SAMSARA_MP_<KEY>`` variables read into typed values
(for ``Config.build``) and exported for child processes, and the ``module:function`` path a
callable setting crosses as."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

from .errors import InvalidConfiguration

__all__ = ["ENV_PREFIX", "env_name", "read_env", "export_to_env", "resolve_callable", "callable_path"]

log = logging.getLogger("samsara_mp")

ENV_PREFIX = "SAMSARA_MP_"
# What Kubernetes sets in every pod for a Service named "samsara-mp": not ours.
_SERVICE_LINK_RE = re.compile(
    ENV_PREFIX
    + r"(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)"
)
_warned_env: set[str] = set()
_INT_RE = re.compile(r"[+-]?[0-9]+")


def env_name(key: str) -> str:
    """The variable that holds ``key``: ``SAMSARA_MP_<KEY>``."""
    return ENV_PREFIX + ("SOURCE_ID" if key == "sourceId" else key.upper())


def read_env(env: Mapping[str, str], types: Mapping[str, str], given: Container[str]) -> dict[str, Any]:
    """The settings ``env`` holds for the keys of ``types`` (key -> annotation) not in
    ``given``, each parsed to its type; ``InvalidConfiguration`` naming a key whose
    variable does not parse."""
    _warn_unknown_env(env, types)
    values: dict[str, Any] = {}
    for name, type_name in types.items():
        if name not in given and env_name(name) in env:
            values[name] = _from_env(name, env[env_name(name)], type_name)
    return values


def export_to_env(values: Mapping[str, Any]) -> None:
    """Set ``SAMSARA_MP_<KEY>`` in this process's environment for each key (None
    removes it), so child processes build the same configuration from it.

    The environment is readable only by the process's own user
    (``/proc/<pid>/environ`` is 0400), so a URL's credentials stay private there.
    """
    for key, value in values.items():
        name = env_name(key)
        if callable(value):
            path = callable_path(value)
            if path is None:
                log.warning(
                    "samsara_mp: %s is a callable that other processes cannot import; processes "
                    "started by spawn, forkserver or a subprocess will not run it: pass a "
                    "'module:function' string", key,
                )
                continue
            value = path
        if value is None:
            os.environ.pop(name, None)
        elif isinstance(value, bool):
            os.environ[name] = "true" if value else "false"
        elif isinstance(value, Mapping):
            os.environ[name] = json.dumps(dict(value))
        else:
            os.environ[name] = str(value)


def resolve_callable(key: str, path: str) -> Callable[..., Any]:
    """Import ``module:function`` (or ``module.function``); ``InvalidConfiguration`` naming
    ``key`` when it is not importable or not callable."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise InvalidConfiguration(key, f"{path!r} is not an importable 'module:function' path")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidConfiguration(key, f"cannot import {path!r}: {exc}") from exc
    if not callable(target):
        raise InvalidConfiguration(key, f"{path!r} is not callable")
    return target  # type: ignore[no-any-return]


def callable_path(fn: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` of ``fn`` when importing it gives ``fn`` back, else None."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__" \
            or "<" in qualname:
        return None
    path = f"{module}:{qualname}"
    try:
        found = resolve_callable("callable", path)
    except InvalidConfiguration:
        return None
    return path if found is fn else None


def _warn_unknown_env(env: Mapping[str, str], keys: Iterable[str]) -> None:
    """Log (once per name) a ``SAMSARA_MP_*`` variable that names no key: a typo would
    otherwise be silently ignored."""
    known = frozenset(env_name(key) for key in keys)
    unknown = [k for k in env if k.startswith(ENV_PREFIX) and k not in known
               and k not in _warned_env and not _SERVICE_LINK_RE.fullmatch(k)]
    if not unknown:
        return
    import difflib  # here: only when something is misspelt

    suffixes = sorted(n[len(ENV_PREFIX):] for n in known)
    for name in unknown:
        _warned_env.add(name)
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], suffixes, n=1)
        log.warning("samsara_mp: environment variable %s is not a setting; ignored%s", name,
                    f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else "")


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise InvalidConfiguration(name, f"environment value {raw!r} is not a boolean")


def _parse_int(name: str, raw: str) -> int:
    text = raw.strip()  # surrounding blanks, as an env file may leave them; nothing else
    if not _INT_RE.fullmatch(text):
        raise InvalidConfiguration(name, f"environment value {raw!r} is not an integer")
    return int(text)


def _parse_headers(name: str, raw: str) -> dict[str, str]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise InvalidConfiguration(name, "environment value is not a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidConfiguration(name, "environment value is not a JSON object")
    return value


def _parse_float(name: str, raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise InvalidConfiguration(name, f"environment value {raw!r} is not a number") from None


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "bool": _parse_bool, "int": _parse_int, "float": _parse_float,
}


def _from_env(name: str, raw: str, type_name: object) -> Any:
    if name == "headers":
        return _parse_headers(name, raw)
    parser = _PARSERS.get(str(type_name))
    return raw if parser is None else parser(name, raw)
