"""The ``samsara-mp`` command line: run a publisher, inspect one, send, serve, demo.

It sits at the edges of DESIGN.md's data flow: ``publisher`` runs the
channel's publisher process in the foreground (for systemd, supervisord or a
sidecar), ``status`` asks a running publisher for its counters over the
channel's socket (or, given no channel, every channel's publisher under the
runtime directory), ``send`` POSTs one event synchronously, ``ingest-server``
runs the reference Ingestion API server and ``demo`` runs the whole pipeline
(server, publisher, worker processes) on this machine.

Exit codes: 0 ok, 1 failure or refused by the API, 2 usage error (including
an invalid event or configuration), 3 no publisher reachable (or, for
``publisher``, another publisher already holds the channel).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__
from ._env import ENV_PREFIX
from ._redact import redact_url_safe
from .config import Config
from .errors import ChannelError, InvalidConfiguration, InvalidEvent, PublishError

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_PUBLISHER = 3

# Config.build needs a url; a status query only cares about the channel.
_PLACEHOLDER_URL = "http://127.0.0.1/"
_LOG_FORMAT = "%(asctime)s samsara-mp[%(process)d] %(levelname)s %(message)s"

# Publisher settings exposed as options: (Config key, metavar, help). Defaults
# stay None so that SAMSARA_MP_<KEY> and Config's defaults apply when omitted.
_PUBLISHER_OPTIONS: tuple[tuple[str, str, str], ...] = (
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


def _err(message: str) -> None:
    print(f"samsara-mp: {message}", file=sys.stderr)


def _add_channel_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--channel", default=None, help=f"channel name (default: {ENV_PREFIX}CHANNEL or from the url)"
    )
    parser.add_argument(
        "--runtime-dir", default=None, help="base directory of channel runtime dirs"
    )


# ---------------------------------------------------------------- publisher
def _cmd_publisher(args: argparse.Namespace) -> int:
    from .publisher import EXIT_LOST_ELECTION, PublisherProcess

    _configure_logging(args.log_level)
    settings: dict[str, Any] = {"idle_timeout": 0}  # a foreground publisher never idle-exits
    for key, _, _ in _PUBLISHER_OPTIONS:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    # Keys left out (not passed as None) so that Config.build falls back to the environment.
    for key in ("url", "channel", "runtime_dir", "compression", "spool_dir", "metrics_host",
                "overflow"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.url and redact_url_safe(args.url) != args.url:
        _err(f"warning: the credentials in --url are visible to every local user (ps); "
             f"set {ENV_PREFIX}URL instead")
    try:
        config = Config.build(**settings)
        proc = PublisherProcess(config, owner_pid=None)
    except (InvalidConfiguration, ChannelError) as exc:
        _err(str(exc))
        return EXIT_USAGE if isinstance(exc, InvalidConfiguration) else EXIT_FAILURE
    signal.signal(signal.SIGTERM, proc.request_stop)
    signal.signal(signal.SIGINT, proc.request_stop)
    try:
        code = proc.run()
    except (ChannelError, OSError) as exc:
        _err(f"publisher failed: {exc}")
        return EXIT_FAILURE
    if code == EXIT_LOST_ELECTION:
        info = proc.channel.read_info() or {}
        holder = f" (pid {info['pid']})" if "pid" in info else ""
        _err(
            f"channel {proc.channel.name} already has a publisher{holder}; "
            f"not starting another (lock {proc.channel.lock_path})"
        )
        return EXIT_NO_PUBLISHER
    return code


# ------------------------------------------------------------------- status
def _status_config(args: argparse.Namespace) -> Config:
    settings: dict[str, Any] = {}
    if args.url:
        settings["url"] = args.url
    if args.channel:
        settings["channel"] = args.channel
    if args.runtime_dir:
        settings["runtime_dir"] = args.runtime_dir
    if "url" not in settings and ENV_PREFIX + "URL" not in os.environ:
        if "channel" not in settings and ENV_PREFIX + "CHANNEL" not in os.environ:
            raise InvalidConfiguration(
                "channel", f"give --url or --channel (or set {ENV_PREFIX}URL / {ENV_PREFIX}CHANNEL)"
            )
        settings["url"] = _PLACEHOLDER_URL
    return Config.build(**settings)


def _fetch_stats(config: Config, timeout: float) -> dict[str, Any]:
    from .channel import Channel

    conn = Channel(config).connect(timeout)
    try:
        stats: dict[str, Any] = conn.call("stats")
    finally:
        conn.close()
    return stats


def _when(ts: object) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    ago = max(time.time() - ts, 0.0)
    return f"{datetime.fromtimestamp(ts).isoformat(sep=' ', timespec='seconds')} ({ago:.1f}s ago)"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_stats(stats: dict[str, Any]) -> str:
    """The human table of a publisher's stats."""
    raw, sent = int(stats.get("bytes_raw", 0)), int(stats.get("bytes_sent", 0))
    ratio = f" ({raw / sent:.1f}x)" if sent else ""
    error = stats.get("last_error")
    rows = [
        ("channel", stats.get("channel", "?")),
        ("url", stats.get("url", "?")),
        ("publisher_pid", stats.get("publisher_pid", "?")),
        ("uptime", _duration(float(stats.get("uptime_s", 0.0)))),
        # The publisher counts the connection this query came on.
        ("connected_clients", max(int(stats.get("connected_clients", 1)) - 1, 0)),
        ("recorded", f"{stats.get('recorded', 0):,}"),
        ("delivered", f"{stats.get('delivered', 0):,}"),
        ("dropped_overflow", f"{stats.get('dropped_overflow', 0):,}"),
        ("rejected", f"{stats.get('rejected', 0):,}"),
        # Never recorded: left out by the workers' before_send and sampling.
        ("filtered", f"{stats.get('filtered', 0):,}"),
        ("sampled_out", f"{stats.get('sampled_out', 0):,}"),
        ("buffered", f"{stats.get('buffered', 0):,}"),
        ("spooled", f"{stats.get('spooled', 0):,}"),
        ("restored", f"{stats.get('restored', 0):,}"),
        ("dropped_spool", f"{stats.get('dropped_spool', 0):,}"),
        ("spool_pending", f"{stats.get('spool_pending', 0):,} events, "
                          f"{stats.get('spool_bytes', 0):,} bytes on disk"
                          + (f", {stats['spool_errors']:,} write errors" if stats.get("spool_errors") else "")
                          + (f", {stats['spool_corrupt']:,} damaged spans skipped"
                             if stats.get("spool_corrupt") else "")),
        ("batches", f"{stats.get('batches', 0):,}"),
        ("bytes_raw/sent", f"{raw:,} / {sent:,}{ratio}"),
        ("retries", f"{stats.get('retries', 0):,}"),
        ("last_error", f"{error} at {_when(stats.get('last_error_at'))}" if error else "none"),
        ("last_success_at", _when(stats.get("last_success_at"))),
        ("loop", "alive" if stats.get("loop_alive", True) else "DEAD"),
        ("loop_errors", f"{stats.get('loop_errors', 0):,}"),
        ("oldest_buffered", _duration(float(stats.get("oldest_buffered_age_s", 0.0)))
         + ("  STALE: no delivery for longer than a few intervals" if stats.get("stale") else "")),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def healthy(stats: dict[str, Any]) -> bool:
    """A publisher whose loop runs and whose events do not wait past a few intervals;
    ``status`` exits 1 otherwise, so a health check can act on it."""
    return bool(stats.get("loop_alive", False)) and not stats.get("stale", False)


def _prometheus(channels: list[tuple[str, dict[str, Any] | None]]) -> str:
    from .metrics import exposition

    return exposition(channels)


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        return _status(args)
    except KeyboardInterrupt:
        if args.watch is None:
            raise
        return EXIT_OK  # Ctrl-C is how a watch ends


def _selects_a_channel(args: argparse.Namespace) -> bool:
    return bool(args.url or args.channel or os.environ.get(ENV_PREFIX + "URL")
                or os.environ.get(ENV_PREFIX + "CHANNEL"))


def _status(args: argparse.Namespace) -> int:
    if args.format == "prometheus":
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            _err("--format prometheus needs prometheus_client: pip install 'samsara-mp[prometheus]'")
            return EXIT_USAGE
    if not _selects_a_channel(args):
        return _status_all(args)
    try:
        config = _status_config(args)
    except InvalidConfiguration as exc:
        _err(str(exc))
        return EXIT_USAGE
    redraw = sys.stdout.isatty() and args.format == "table"
    while True:
        try:
            stats = _fetch_stats(config, args.timeout)
        except ChannelError as exc:
            _err(str(exc))
            return EXIT_FAILURE
        except (OSError, EOFError) as exc:  # IPCError is an OSError
            message = f"no publisher answers on channel {config.channel_name}: {exc}"
            if args.watch is None:
                _err(message)
                if args.format == "prometheus":  # a scrape still says the publisher is down
                    print(_prometheus([(config.channel_name, None)]), end="")
                return EXIT_NO_PUBLISHER
            # A watch outlives publisher restarts; stdout keeps only stats (JSON lines stay JSON).
            _err(message + "; still watching")
        else:
            if args.format == "json":
                text = json.dumps(stats, sort_keys=True)
            elif args.format == "prometheus":
                text = _prometheus([(config.channel_name, stats)]).rstrip("\n")
            else:
                text = format_stats(stats)
            if args.watch is None:
                print(text)
                return EXIT_OK if healthy(stats) else EXIT_FAILURE
            if redraw:
                print("\033[H\033[J" + time.strftime("%H:%M:%S\n") + text, flush=True)
            else:
                print(text if args.format != "table" else text + "\n", flush=True)
        time.sleep(args.watch)


def _runtime_base(args: argparse.Namespace) -> Path:
    from .channel import _base_dir

    return _base_dir(args.runtime_dir or os.environ.get(ENV_PREFIX + "RUNTIME_DIR") or None)


def _survey(base: Path, timeout: float) -> list[dict[str, Any]]:
    """One entry per channel directory under ``base``: its publisher's stats when one answers."""
    try:
        names = sorted(entry.name for entry in base.iterdir() if entry.is_dir())
    except OSError:
        return []
    found = []
    for name in names:
        try:
            config = Config.build(env={}, url=_PLACEHOLDER_URL, channel=name, runtime_dir=str(base))
        except InvalidConfiguration:
            continue  # not a channel's directory
        entry: dict[str, Any] = {"channel": name, "dir": str(base / name), "running": False}
        try:
            stats = _fetch_stats(config, timeout)
        except (ChannelError, OSError, EOFError) as exc:  # IPCError is an OSError
            entry["error"] = str(exc)
        else:
            entry.update(running=True, publisher_pid=stats.get("publisher_pid"),
                         uptime_s=stats.get("uptime_s"), buffered=stats.get("buffered"),
                         last_success_at=stats.get("last_success_at"),
                         loop_alive=stats.get("loop_alive"), stats=stats)
        found.append(entry)
    return found


def format_survey(base: Path, channels: list[dict[str, Any]]) -> str:
    """The human table of every channel under a runtime directory."""
    if not channels:
        return f"no channels under {base}"
    rows = [("channel", "pid", "uptime", "buffered", "last success", "loop")]
    for ch in channels:
        if not ch["running"]:
            rows.append((ch["channel"], "-", "-", "-", "-", "no publisher answers"))
            continue
        rows.append((
            ch["channel"], str(ch["publisher_pid"]), _duration(float(ch["uptime_s"] or 0.0)),
            f"{int(ch['buffered'] or 0):,}", _when(ch["last_success_at"]),
            "alive" if ch["loop_alive"] else "DEAD",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return f"channels under {base}:\n" + "\n".join(lines)


def _status_all(args: argparse.Namespace) -> int:
    """``status`` with no channel: every channel under the runtime directory, at a glance."""
    base = _runtime_base(args)
    redraw = sys.stdout.isatty() and args.format == "table"
    while True:
        channels = _survey(base, args.timeout)
        if args.format == "json":
            text = json.dumps({"runtime_dir": str(base), "channels": channels}, sort_keys=True)
        elif args.format == "prometheus":
            text = _prometheus([(ch["channel"], ch.get("stats")) for ch in channels]).rstrip("\n")
        else:
            text = format_survey(base, channels)
        if args.watch is None:
            print(text)
            return EXIT_OK if any(ch["running"] for ch in channels) else EXIT_NO_PUBLISHER
        if redraw:
            print("\033[H\033[J" + time.strftime("%H:%M:%S\n") + text, flush=True)
        else:
            print(text if args.format != "table" else text + "\n", flush=True)
        time.sleep(args.watch)


# --------------------------------------------------------------------- send
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


def _cmd_send(args: argparse.Namespace) -> int:
    from .client import SamsaraClient

    try:
        event = _parse_pairs(args.fields)
    except ValueError as exc:
        _err(f"send: {exc}")
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
        _err(str(exc))
        return EXIT_USAGE
    try:
        client.publish_events([event])
    except InvalidEvent as exc:
        _err(str(exc))
        return EXIT_USAGE
    except PublishError as exc:
        if exc.status is None:
            _err(f"could not reach the API: {exc}")
        else:
            _err(f"refused (HTTP {exc.status}): {exc}")
        if exc.body:
            _err(f"API said: {exc.body}")
        return EXIT_FAILURE
    finally:
        client.close()
    print(f"accepted by {client.config.endpoint}")
    return EXIT_OK


# -------------------------------------------------------------- ingest/demo
def _cmd_ingest_server(args: argparse.Namespace) -> int:
    from .ingest.__main__ import main as ingest_main

    return ingest_main(args.ingest_argv)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    _configure_logging(args.log_level)
    return run(args)


# ------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The full ``samsara-mp`` parser (subcommands and their options)."""
    from .demo import add_arguments as add_demo_arguments
    from .ingest.__main__ import build_arg_parser as ingest_parser

    parser = argparse.ArgumentParser(
        prog="samsara-mp",
        description="One shared buffer and one publisher for every process of an app, "
        "for the Samsara Ingestion API.",
        epilog="exit codes: 0 ok, 1 failure/refused, 2 usage error or invalid event/configuration, "
        "3 no publisher reachable. "
        "Try `samsara-mp demo` first.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")

    p = sub.add_parser(
        "publisher",
        help="run a channel's publisher in the foreground",
        description="Run the channel's publisher in this process until SIGTERM/SIGINT, "
        "then drain. Exits 3 when another publisher already holds the channel. "
        f"Options not given come from {ENV_PREFIX}<KEY> environment variables.",
    )
    p.add_argument("--url", default=None, help=f"Ingestion API base URL (default: {ENV_PREFIX}URL)")
    _add_channel_options(p)
    for key, metavar, text in _PUBLISHER_OPTIONS:
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int, metavar=metavar, help=text)
    p.add_argument("--compression", choices=("gzip", "none"), default=None, help="default gzip")
    p.add_argument("--spool-dir", default=None, help="where undrained events are spooled")
    p.add_argument("--metrics-host", default=None, help="address /metrics binds to (default 127.0.0.1)")
    p.add_argument("--overflow", choices=("drop", "spool"), default=None,
                   help="a full buffer drops its oldest (drop, default) or moves them to disk (spool)")
    p.add_argument("--log-level", choices=levels, default="INFO", help="default INFO")
    p.set_defaults(func=_cmd_publisher)

    p = sub.add_parser(
        "status",
        help="show a running publisher's counters, or every channel's at a glance",
        description="Ask the channel's publisher for its stats. With no --url or --channel "
        f"(and no {ENV_PREFIX}URL / {ENV_PREFIX}CHANNEL), list every channel under the runtime "
        "directory with its publisher's pid, uptime, buffered events, last success and whether "
        "its publish loop is alive. Exits 3 when no publisher answers; for one channel, 1 when "
        "its publish loop is dead or events have waited past a few intervals with no delivery "
        "(stale).",
    )
    p.add_argument("--url", default=None, help="the app's base URL (selects its default channel)")
    _add_channel_options(p)
    p.add_argument("--json", action="store_const", dest="format", const="json", default="table",
                   help="print the raw stats as JSON (same as --format json)")
    p.add_argument("--format", choices=("table", "json", "prometheus"), default="table",
                   help="table (default), json, or the Prometheus text format (needs prometheus_client)")
    p.add_argument(
        "--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
        help="refresh every SECONDS (default 2) until interrupted",
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "send",
        help="publish one event synchronously",
        description="POST one event now. Values are parsed as JSON when they can be "
        "(level=10 is a number), else kept as strings. Exits 1 when the API refuses it, "
        "2 when the event is invalid.",
    )
    p.add_argument("--url", default=None, help=f"Ingestion API base URL (default: {ENV_PREFIX}URL)")
    p.add_argument("--source-id", default=None, help="sourceId when the event has none "
                   f"(default: {ENV_PREFIX}SOURCE_ID, else the host name)")
    p.add_argument("--send-timeout", type=int, default=None, metavar="MS",
                   help="bound on the whole POST: connect, send and answer (default 30000)")
    p.add_argument("--compression", choices=("gzip", "none"), default=None)
    p.add_argument("fields", nargs="+", metavar="key=value",
                   help="eventName=... [sourceId=...] [timestamp=MS] [property=value ...]")
    p.set_defaults(func=_cmd_send)

    ingest = ingest_parser(prog="samsara-mp ingest-server")
    p = sub.add_parser(
        "ingest-server",
        help="run the reference Ingestion API server",
        description=ingest.description,
        parents=[ingest],
        add_help=False,
    )
    p.set_defaults(func=_cmd_ingest_server)

    p = sub.add_parser(
        "demo",
        help="run server, publisher and worker processes here, and report",
        description="Start the reference Ingestion API server, a publisher and N worker "
        "processes that record events, show live progress, and check that every "
        "recorded event was delivered or counted as dropped.",
    )
    add_demo_arguments(p)
    p.add_argument("--log-level", choices=levels, default="WARNING", help="default WARNING")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``samsara-mp`` and ``python -m samsara_mp``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "ingest-server":
        # Hand the server its own arguments untouched: its parser is the authority.
        args.ingest_argv = argv[argv.index("ingest-server") + 1 :]
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # e.g. `samsara-mp status --watch | head`; keep the interpreter from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return code
