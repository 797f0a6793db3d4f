"""The one validated, immutable configuration, built once at the edge (client, CLI, integrations)
from keyword arguments, then ``SAMSARA_MP_<KEY>`` variables, then defaults; a launched publisher
gets it as :meth:`Config.to_dict` through a pipe, and builds it again."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import _network, _redact
from ._env import ENV_PREFIX, callable_path, export_to_env, read_env, resolve_callable
from ._redact import redact_url
from .errors import InvalidConfiguration

__all__ = [
    "Config", "KEYS", "ENV_PREFIX", "OFFLINE_URL", "redact_url", "export_to_env", "resolve_callable",
    "callable_path", "check_keys",
]

_CHANNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_COMPRESSIONS = ("gzip", "none")
# The url of a client that never sends (``disabled``, or made inside
# ``testing.capture_events()`` with no url configured): .invalid never resolves.
OFFLINE_URL = "http://samsara-mp.invalid/"
# Keys that act only in the recording process: they never cross to a publisher.
WORKER_ONLY_KEYS = ("before_send",)
# Every millisecond setting is bounded: a huge value passes int checks and then
# overflows a thread's wait (OverflowError) far from where it was set.
_MAX_MS = 30 * 24 * 3600 * 1000
_MS_KEYS = (
    "publish_interval", "send_timeout", "ship_delay", "ipc_timeout", "shutdown_timeout",
    "exit_timeout", "idle_timeout", "backoff_base", "backoff_cap", "stats_interval",
)


class Config:
    """Every setting of a client and its publisher; build it with :meth:`build`.

    Immutable: :meth:`replace` makes a changed copy. A plain class rather than a
    dataclass, so that a new publisher does not import ``dataclasses`` and ``inspect``
    before it serves (benchmarks/README.md, "Cold start"). The keys are the annotated
    class attributes below, in order (:data:`KEYS`); the first nine, the original
    ``samsara_sdk``'s, keep its names, meanings and defaults.
    """

    url: str
    sourceId: str | None = None
    start_publishing_thread: bool = True
    publish_interval: int = 30_000
    max_buffer_size: int = 10_000
    min_buffer_size: int = 100
    send_timeout: int = 30_000
    compression: str = "gzip"
    send_client_stats: bool = True
    channel: str | None = None
    runtime_dir: str | None = None
    compression_level: int = 1
    max_batch_size: int = 5_000
    max_batch_bytes: int = 4 * 1024 * 1024
    max_event_bytes: int = 64 * 1024
    staging_size: int = 200_000
    staging_bytes: int = 8 * 1024 * 1024
    ship_batch: int = 256
    ship_delay: int = 5
    ipc_timeout: int = 2_000
    shutdown_timeout: int = 10_000
    exit_timeout: int = 5_000
    idle_timeout: int = 60_000
    backoff_base: int = 100
    backoff_cap: int = 30_000
    spool_dir: str | None = None
    # "drop": a full shared buffer drops its oldest (the original client's way);
    # "spool": they move to a bounded outage spool on disk and are sent first after.
    overflow: str = "drop"
    spool_max_bytes: int = 1024 * 1024 * 1024
    shipper: str = "auto"
    stats_interval: int = 60_000
    on_success: str | None = None
    on_failure: str | None = None
    # Run in the recording process (record_event, publish_events), never in the publisher.
    before_send: str | Callable[[dict[str, Any]], Any] | None = None
    sample_rate: float = 1.0
    disabled: bool = False
    # A timestamp under 10**12 ms (before 2001-09-09) is allowed, but is most often seconds.
    warn_small_timestamps: bool = True
    # The publisher serves Prometheus /metrics here (0: off; needs the prometheus extra).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Extra HTTP headers for every POST (an Authorization for a proxy in front of the
    # API): as secret as the URL's credentials, never logged, shown or put on argv.
    headers: Mapping[str, str] | None = None
    # The connection (README, "Proxies and TLS"): None takes HTTPS_PROXY/HTTP_PROXY/ALL_PROXY/
    # NO_PROXY and REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE as requests does, read where the config is
    # built. The proxy's credentials are as secret as the URL's.
    proxy: str | None = None
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    verify: bool = True

    def __init__(self, **values: Any) -> None:
        for name in KEYS:
            if name in values:
                value = values.pop(name)
            elif name in _DEFAULTS:
                value = _DEFAULTS[name]
            else:
                raise TypeError(f"Config() missing required key {name!r}")
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"Config() got unknown keys {sorted(values)}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Config is immutable: use replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Config is immutable")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in KEYS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Config)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        # Never show the URL's credentials or the headers' values, wherever a config is printed.
        shown = {name: getattr(self, name) for name in KEYS}
        shown["url"] = _redact.redact_url(self.url)
        if self.headers:
            shown["headers"] = _redact.redact_headers(self.headers)
        if isinstance(self.proxy, str):
            shown["proxy"] = _redact.redact_url_safe(self.proxy)
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @classmethod
    def build(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> Config:
        """Merge keyword arguments > environment > defaults, validating each key.

        Reading this process's environment (``env`` None), ``proxy`` and ``ca_bundle``
        not given come from requests' variables (:func:`_network.from_environ`)."""
        env = os.environ if env is None else env
        check_keys(kwargs)
        # An explicit None means "not given" (the environment may fill it in),
        # except for compression, where the original SDK spelled "none" as None.
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "compression"}
        values: dict[str, Any] = read_env(env, _TYPES, given=kwargs) | kwargs
        if "compression" in values and values["compression"] is None:
            values["compression"] = "none"  # the original SDK's spelling of no compression
        if ("url" not in values or values["url"] is None) and values.get("disabled") is True:
            values["url"] = OFFLINE_URL  # a disabled client needs no url: it never sends
        if "url" not in values or values["url"] is None:
            raise InvalidConfiguration("url", f"missing: pass url=... or set {ENV_PREFIX}URL")
        if env is os.environ and isinstance(values["url"], str):
            values |= _network.from_environ(values["url"], values, env)
        config = cls(**values)
        config._validate()
        return config

    def replace(self, **changes: Any) -> Config:
        """A copy with some keys changed, validated again."""
        check_keys(changes)
        new = Config(**{name: changes.get(name, getattr(self, name)) for name in KEYS})
        new._validate()
        return new

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain, JSON-able dict (what crosses to another process).

        A ``before_send`` given as a callable becomes its ``"module:function"``
        path when importing that path gives the same function, else None (a
        lambda, a nested function, one in ``__main__``): a callable cannot cross.
        """
        out = {name: getattr(self, name) for name in KEYS}
        if out["headers"] is not None:
            out["headers"] = dict(out["headers"])
        if callable(out["before_send"]):
            out["before_send"] = callable_path(out["before_send"])
        return out

    @property
    def before_send_hook(self) -> Callable[[dict[str, Any]], Any] | None:
        """``before_send`` as a callable (a string resolved), or None."""
        value = self.before_send
        if value is None or callable(value):
            return value
        return resolve_callable("before_send", value)

    # Exact: the original SDK rounded milliseconds down to whole seconds.
    @property
    def endpoint(self) -> str:
        """``{url}/v1/events``, keeping any path prefix of the base URL."""
        return self.url.rstrip("/") + "/v1/events"

    @property
    def channel_name(self) -> str:
        """The channel: configured, or derived from the URL so one app shares one."""
        if self.channel:
            return self.channel
        import hashlib  # here: a launched publisher is given its channel's name

        digest = hashlib.sha256(self.url.rstrip("/").encode()).hexdigest()[:12]
        return f"samsara-{digest}"

    @property
    def publish_interval_s(self) -> float:
        return self.publish_interval / 1000.0

    @property
    def send_timeout_s(self) -> float:
        return self.send_timeout / 1000.0

    @property
    def ship_delay_s(self) -> float:
        return self.ship_delay / 1000.0

    @property
    def ipc_timeout_s(self) -> float:
        return self.ipc_timeout / 1000.0

    @property
    def shutdown_timeout_s(self) -> float:
        return self.shutdown_timeout / 1000.0

    @property
    def exit_timeout_s(self) -> float:
        return self.exit_timeout / 1000.0

    @property
    def idle_timeout_s(self) -> float:
        return self.idle_timeout / 1000.0

    def _validate(self) -> None:
        _check_url(self.url)
        if self.sourceId is not None and (not isinstance(self.sourceId, str) or not self.sourceId):
            raise InvalidConfiguration("sourceId", "must be a non-empty string or None")
        for name in ("start_publishing_thread", "send_client_stats", "warn_small_timestamps"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidConfiguration(name, f"must be True or False, not {getattr(self, name)!r}")
        positive = (
            "publish_interval", "max_buffer_size", "send_timeout", "max_batch_size",
            "max_batch_bytes", "max_event_bytes", "staging_size", "staging_bytes", "ship_batch",
            "ipc_timeout", "backoff_base", "backoff_cap", "stats_interval", "spool_max_bytes",
        )
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("min_buffer_size", "ship_delay", "shutdown_timeout", "idle_timeout",
                     "exit_timeout"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in _MS_KEYS:
            if getattr(self, name) > _MAX_MS:
                raise InvalidConfiguration(name, f"{getattr(self, name)} ms is more than {_MAX_MS} (30 days)")
        if self.min_buffer_size > self.max_buffer_size:
            raise InvalidConfiguration(
                "min_buffer_size",
                f"{self.min_buffer_size} is larger than max_buffer_size {self.max_buffer_size}",
            )
        if self.staging_bytes < self.max_event_bytes:
            # Named by the key moved off its default (staging_bytes when both were).
            if self.staging_bytes == Config.staging_bytes:
                raise InvalidConfiguration(
                    "max_event_bytes",
                    f"{self.max_event_bytes} is larger than staging_bytes {self.staging_bytes}",
                )
            raise InvalidConfiguration(
                "staging_bytes",
                f"{self.staging_bytes} is smaller than max_event_bytes {self.max_event_bytes}",
            )
        if self.backoff_cap < self.backoff_base:
            raise InvalidConfiguration("backoff_cap", "must be at least backoff_base")
        _network.check_headers(self.headers)
        _network.check_network(self.proxy, self.ca_bundle, self.client_cert, self.client_key, self.verify)
        if self.compression not in _COMPRESSIONS:
            raise InvalidConfiguration("compression", f"{self.compression!r} is not one of {_COMPRESSIONS}")
        _check_int("compression_level", self.compression_level, minimum=1)
        if self.compression_level > 9:
            raise InvalidConfiguration("compression_level", "must be between 1 and 9")
        if self.channel is not None and (
            not isinstance(self.channel, str) or not _CHANNEL_RE.fullmatch(self.channel)
        ):
            raise InvalidConfiguration("channel", "must be 1-64 characters of letters, digits, '_', '.', '-'")
        if self.overflow not in ("drop", "spool"):
            raise InvalidConfiguration("overflow", f"{self.overflow!r} is not one of 'drop', 'spool'")
        if self.spool_max_bytes < 64 * 1024:
            raise InvalidConfiguration(
                "spool_max_bytes", f"{self.spool_max_bytes} is less than 65536 (64 KiB)"
            )
        if self.shipper not in ("auto", "thread", "inline"):
            raise InvalidConfiguration(
                "shipper", f"{self.shipper!r} is not one of 'auto', 'thread', 'inline'"
            )
        for name in ("on_success", "on_failure"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or ":" not in value):
                raise InvalidConfiguration(
                    name, f"{value!r} must be an importable 'package.module:function' path"
                )
            if value is not None:
                # Resolved here, where the mistake is made: a path the publisher cannot
                # import would otherwise fail every publisher's start.
                resolve_callable(name, value)
        if self.before_send is not None:
            if isinstance(self.before_send, str):
                resolve_callable("before_send", self.before_send)  # importable now, or refused now
            elif not callable(self.before_send):
                raise InvalidConfiguration(
                    "before_send",
                    f"must be a callable or a 'module:function' string, not {self.before_send!r}",
                )
        rate = self.sample_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
            raise InvalidConfiguration("sample_rate", f"must be a number from 0.0 to 1.0, not {rate!r}")
        if not 0.0 <= rate <= 1.0:
            raise InvalidConfiguration("sample_rate", f"must be from 0.0 to 1.0, not {rate}")
        if not isinstance(self.disabled, bool):
            raise InvalidConfiguration("disabled", f"must be True or False, not {self.disabled!r}")
        _check_int("metrics_port", self.metrics_port, minimum=0)
        if self.metrics_port > 65535:
            raise InvalidConfiguration("metrics_port", f"{self.metrics_port} is not a TCP port (0-65535)")
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            raise InvalidConfiguration("metrics_host", "must be a non-empty host name or address")
        if self.metrics_port and importlib.util.find_spec("prometheus_client") is None:
            raise InvalidConfiguration(
                "metrics_port", "needs prometheus_client: pip install 'samsara-mp[prometheus]'"
            )
        for name in ("runtime_dir", "spool_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidConfiguration(name, "must be a non-empty path string or None")


# Annotations are strings (future annotations): _env parses a variable by its key's type name.
KEYS: tuple[str, ...] = tuple(Config.__annotations__)
_KEY_SET = frozenset(KEYS)
_TYPES: dict[str, str] = dict(Config.__annotations__)
_DEFAULTS: dict[str, Any] = {name: vars(Config)[name] for name in KEYS if name in vars(Config)}


def check_keys(keys: Iterable[str]) -> None:
    """``InvalidConfiguration`` naming the first of ``keys`` that is no configuration key."""
    for key in keys:
        if key not in _KEY_SET:
            raise InvalidConfiguration(key, "unknown configuration key")


def _check_url(url: object) -> None:
    parts = _redact.split_url_setting("url", url, "a non-empty string")
    assert isinstance(url, str)
    shown = _redact.redact_url_safe(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidConfiguration("url", f"{shown!r} is not an http(s) URL with a host")
    if "?" in url or "#" in url or _redact.credentials_in_path(url, parts.path):
        # The events go to {url}/v1/events: a query or fragment would swallow that path.
        # And a password holding an unencoded / ? # ends the host early, leaving the
        # rest (credentials included) in the path, where no redaction can find it.
        raise InvalidConfiguration(
            "url", f"{shown!r} must be a base URL without '?' or '#', and "
            "credentials must be percent-encoded (a password's '/' as %2F, '?' as %3F, '#' as %23)",
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfiguration(name, f"must be an integer, not {value!r}")
    if value < minimum:
        raise InvalidConfiguration(name, f"must be >= {minimum}, not {value}")
