"""The ``samsara-mp`` command line at the edges of the data flow in docs/design.md: the argument
parser and ``main()``, which hands ``status`` to cli.status and the other commands to cli.commands.
Exit codes are cli._common's; the parser's epilog lists them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from .._env import ENV_PREFIX
from ._common import EXIT_OK
from .commands import PUBLISHER_OPTIONS, cmd_demo, cmd_ingest_server, cmd_publisher, cmd_send
from .status import cmd_status

__all__ = ["build_parser", "main"]


def _add_channel_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--channel", default=None, help=f"channel name (default: {ENV_PREFIX}CHANNEL or from the url)"
    )
    parser.add_argument(
        "--runtime-dir", default=None, help="base directory of channel runtime dirs"
    )


def build_parser() -> argparse.ArgumentParser:
    """The full ``samsara-mp`` parser (subcommands and their options)."""
    from ..demo import add_arguments as add_demo_arguments
    from ..ingest.__main__ import build_arg_parser as ingest_parser

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
    for key, metavar, text in PUBLISHER_OPTIONS:
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int, metavar=metavar, help=text)
    p.add_argument("--compression", choices=("gzip", "none"), default=None, help="default gzip")
    p.add_argument("--spool-dir", default=None, help="where undrained events are spooled")
    p.add_argument("--metrics-host", default=None, help="address /metrics binds to (default 127.0.0.1)")
    p.add_argument("--overflow", choices=("drop", "spool"), default=None,
                   help="a full buffer drops its oldest (drop, default) or moves them to disk (spool)")
    p.add_argument("--log-level", choices=levels, default="INFO", help="default INFO")
    p.set_defaults(func=cmd_publisher)

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
    p.set_defaults(func=cmd_status)

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
    p.set_defaults(func=cmd_send)

    ingest = ingest_parser(prog="samsara-mp ingest-server")
    p = sub.add_parser(
        "ingest-server",
        help="run the reference Ingestion API server",
        description=ingest.description,
        parents=[ingest],
        add_help=False,
    )
    p.set_defaults(func=cmd_ingest_server)

    p = sub.add_parser(
        "demo",
        help="run server, publisher and worker processes here, and report",
        description="Start the reference Ingestion API server, a publisher and N worker "
        "processes that record events, show live progress, and check that every "
        "recorded event was delivered or counted as dropped.",
    )
    add_demo_arguments(p)
    p.add_argument("--log-level", choices=levels, default="WARNING", help="default WARNING")
    p.set_defaults(func=cmd_demo)
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
