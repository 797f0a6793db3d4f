"""``samsara-mp status``: asks a channel's publisher for its counters over the channel's socket (or
every channel's publisher under the runtime directory) and turns their health into the exit code.
cli.format renders what it fetched."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .._env import ENV_PREFIX
from ..config import Config
from ..errors import ChannelError, InvalidConfiguration
from ._common import EXIT_FAILURE, EXIT_NO_PUBLISHER, EXIT_OK, EXIT_USAGE, err
from .format import prometheus, render_stats, render_survey, watch_frame

__all__ = ["cmd_status", "healthy"]

# Config.build needs a url; a status query only cares about the channel.
_PLACEHOLDER_URL = "http://127.0.0.1/"


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
    from ..channel import Channel

    conn = Channel(config).connect(timeout)
    try:
        stats: dict[str, Any] = conn.call("stats")
    finally:
        conn.close()
    return stats


def healthy(stats: dict[str, Any]) -> bool:
    """A publisher whose loop runs, whose events do not wait past a few intervals, and
    whose credentials the API takes; ``status`` exits 1 otherwise, so a health check can act."""
    return (bool(stats.get("loop_alive", False)) and not stats.get("stale", False)
            and not stats.get("auth_failing", False))


def cmd_status(args: argparse.Namespace) -> int:
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
            err("--format prometheus needs prometheus_client: pip install 'samsara-mp[prometheus]'")
            return EXIT_USAGE
    if not _selects_a_channel(args):
        return _status_all(args)
    try:
        config = _status_config(args)
    except InvalidConfiguration as exc:
        err(str(exc))
        return EXIT_USAGE
    redraw = sys.stdout.isatty() and args.format == "table"
    while True:
        try:
            stats = _fetch_stats(config, args.timeout)
        except ChannelError as exc:
            err(str(exc))
            return EXIT_FAILURE
        except (OSError, EOFError) as exc:  # IPCError is an OSError
            message = f"no publisher answers on channel {config.channel_name}: {exc}"
            if args.watch is None:
                err(message)
                if args.format == "prometheus":  # a scrape still says the publisher is down
                    print(prometheus([(config.channel_name, None)]), end="")
                return EXIT_NO_PUBLISHER
            # A watch outlives publisher restarts; stdout keeps only stats (JSON lines stay JSON).
            err(message + "; still watching")
        else:
            text = render_stats(config.channel_name, stats, args.format)
            if args.watch is None:
                print(text)
                return EXIT_OK if healthy(stats) else EXIT_FAILURE
            print(watch_frame(text, args.format, redraw), flush=True)
        time.sleep(args.watch)


def _runtime_base(args: argparse.Namespace) -> Path:
    from ..channel import _base_dir

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


def _status_all(args: argparse.Namespace) -> int:
    """``status`` with no channel: every channel under the runtime directory, at a glance."""
    base = _runtime_base(args)
    redraw = sys.stdout.isatty() and args.format == "table"
    while True:
        channels = _survey(base, args.timeout)
        text = render_survey(base, channels, args.format)
        if args.watch is None:
            print(text)
            return EXIT_OK if any(ch["running"] for ch in channels) else EXIT_NO_PUBLISHER
        print(watch_frame(text, args.format, redraw), flush=True)
        time.sleep(args.watch)
