"""The commands that run something, thin over the library: ``publisher`` (a channel's publisher in
the foreground, for systemd, supervisord or a sidecar), ``send`` (one event, synchronously),
``ingest-server`` (the reference Ingestion API server) and ``demo`` (the whole pipeline on this machine)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from .._env import ENV_PREFIX
from .._redact import redact_url_safe
from ..config import Config
from ..errors import ChannelError, InvalidConfiguration, InvalidEvent, PublishError
from ._common import EXIT_FAILURE, EXIT_NO_PUBLISHER, EXIT_OK, EXIT_USAGE, err

__all__ = ["PUBLISHER_OPTIONS", "cmd_demo", "cmd_ingest_server", "cmd_publisher", "cmd_send"]

_LOG_FORMAT = "%(asctime)s samsara-mp[%(process)d] %(levelname)s %(message)s"

# Publisher settings exposed as options: (Config key, metavar, help). Defaults
# stay None so that SAMSARA_MP_<KEY> and Config's defaults apply when omitted.
PUBLISHER_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("publish_interval", "MS", "publish at least this often (default 30000)"),
    ("max_buffer_size", "N", "bound of the shared buffer; the oldest events drop past it"),
    ("min_buffer_size", "N", "events needed before an interval publishes (default 100)"),
    ("send_timeout", "MS", "bound on a whole POST: connect, send and answer (default 30000)"),
    ("shutdown_timeout", "MS", "how long a stop may drain before spooling (default 10000)"),
    ("max_batch_size", "N", "events per POST at most (default 5000)"),
    ("max_batch_bytes", "BYTES", "uncompressed bytes per POST at most"),
    ("compression_level", "1-9", "gzip level (default 1)"),
    ("backoff_base", "MS", "first retry delay (default 100)"),
    ("backoff_cap", "MS", "longest retry delay (default 30000)"),
    ("ipc_timeout", "MS", "bound on every IPC wait (default 2000)"),
    ("metrics_port", "PORT", "serve Prometheus /metrics on this port (default 0: off)"),
    ("spool_max_bytes", "BYTES", "bound of the outage spool on disk (default 1 GiB)"),
)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr, format=_LOG_FORMAT)


def cmd_publisher(args: argparse.Namespace) -> int:
    from ..publisher import EXIT_LOST_ELECTION, PublisherProcess

    _configure_logging(args.log_level)
    settings: dict[str, Any] = {"idle_timeout": 0}  # a foreground publisher never idle-exits
    for key, _, _ in PUBLISHER_OPTIONS:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    # Keys left out (not passed as None) so that Config.build falls back to the environment.
    for key in ("url", "channel", "runtime_dir", "compression", "spool_dir", "metrics_host",
                "overflow"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.url and redact_url_safe(args.url) != args.url:
        err(f"warning: the credentials in --url are visible to every local user (ps); "
             f"set {ENV_PREFIX}URL instead")
    try:
        config = Config.build(**settings)
        proc = PublisherProcess(config, owner_pid=None)
    except (InvalidConfiguration, ChannelError) as exc:
        err(str(exc))
        return EXIT_USAGE if isinstance(exc, InvalidConfiguration) else EXIT_FAILURE
    signal.signal(signal.SIGTERM, proc.request_stop)
    signal.signal(signal.SIGINT, proc.request_stop)
    try:
        code = proc.run()
    except (ChannelError, OSError) as exc:
        err(f"publisher failed: {exc}")
        return EXIT_FAILURE
    if code == EXIT_LOST_ELECTION:
        info = proc.channel.read_info() or {}
        holder = f" (pid {info['pid']})" if "pid" in info else ""
        err(
            f"channel {proc.channel.name} already has a publisher{holder}; "
            f"not starting another (lock {proc.channel.lock_path})"
        )
        return EXIT_NO_PUBLISHER
    return code


def _parse_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not key=value")
        if key in ("eventName", "sourceId"):
            event[key] = raw  # always strings: sourceId=42 means "42"
            continue
        try:
            event[key] = json.loads(raw)
        except ValueError:
            event[key] = raw
    return event


def cmd_send(args: argparse.Namespace) -> int:
    from ..client import SamsaraClient

    try:
        event = _parse_pairs(args.fields)
    except ValueError as exc:
        err(f"send: {exc}")
        return EXIT_USAGE
    source_id = args.source_id or os.environ.get(ENV_PREFIX + "SOURCE_ID") or socket.gethostname()
    settings: dict[str, Any] = {"start_publishing_thread": False, "sourceId": source_id}
    if args.send_timeout is not None:
        settings["send_timeout"] = args.send_timeout
    if args.compression is not None:
        settings["compression"] = args.compression
    try:
        client = SamsaraClient(url=args.url, **settings)
    except (InvalidConfiguration, ChannelError) as exc:
        err(str(exc))
        return EXIT_USAGE
    try:
        client.publish_events([event])
    except InvalidEvent as exc:
        err(str(exc))
        return EXIT_USAGE
    except PublishError as exc:
        if exc.status is None:
            err(f"could not reach the API: {exc}")
        else:
            err(f"refused (HTTP {exc.status}): {exc}")
        if exc.body:
            err(f"API said: {exc.body}")
        return EXIT_FAILURE
    finally:
        client.close()
    print(f"accepted by {client.config.endpoint}")
    return EXIT_OK


def cmd_ingest_server(args: argparse.Namespace) -> int:
    from ..ingest.__main__ import main as ingest_main

    return ingest_main(args.ingest_argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run

    _configure_logging(args.log_level)
    return run(args)
