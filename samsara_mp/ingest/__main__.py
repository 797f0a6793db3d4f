"""Command line for the reference Ingestion API server: ``python -m samsara_mp.ingest``.

Runs ``IngestServer`` in the foreground until SIGTERM or SIGINT, announcing
readiness as one JSON line on stdout (and optionally in a ready file) so a
parent process (a test, a benchmark, ``samsara-mp ingest-server``) can wait
for it instead of guessing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any, Final

from samsara_mp.ingest.server import STORES, IngestServer


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's options to ``parser`` (for reuse as a subcommand)."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    parser.add_argument("--admin-port", type=int, default=0, help="admin port (0: any free port)")
    parser.add_argument("--no-admin", action="store_true", help="run no admin listener")
    parser.add_argument("--out", default=None, help="JSON-lines file for accepted events")
    parser.add_argument(
        "--store",
        choices=STORES,
        default=None,
        help='where accepted events go (default: "file" with --out, else "memory")',
    )
    parser.add_argument("--prefix", default="", help="path prefix before /v1/... on the API port")
    parser.add_argument("--ready-file", default=None, help="also write the ready JSON line here")
    parser.add_argument("--offline", action="store_true", help="start with api-status offline")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    return parser


def build_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(
            prog=prog or "python -m samsara_mp.ingest",
            description="Reference Samsara Ingestion API server (for local runs and tests).",
        )
    )


def _write_atomically(path: str, text: str) -> None:
    # A parent polling for the file must never read half of it.
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ready-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_STOP_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM})


def run(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT, or until ``stop`` is set when one is given; returns 0.

    Without ``stop`` this must run in the main thread, which owns signal handling.
    """
    store = args.store or ("file" if args.out else "memory")
    if store in ("file", "both") and not args.out:
        print(f"--store {store} needs --out FILE", file=sys.stderr)
        return 2
    on_main = threading.current_thread() is threading.main_thread()
    if stop is None and not on_main:
        raise RuntimeError("run() outside the main thread needs a stop event")
    server = IngestServer(
        host=args.host,
        port=args.port,
        admin_port=None if args.no_admin else args.admin_port,
        out_path=args.out,
        store=store,
        prefix=args.prefix,
        verbose=args.verbose,
    )
    # A signal delivered to a server thread would not wake a main thread blocked on
    # a lock, so block the stop signals before the server's threads inherit the mask
    # and collect them with sigwait() in this thread.
    use_sigwait = stop is None and hasattr(signal, "pthread_sigmask")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if use_sigwait else None
    previous: dict[signal.Signals, Any] = {}
    event = stop if stop is not None else threading.Event()
    if stop is None and not use_sigwait:
        for number in _STOP_SIGNALS:
            previous[number] = signal.signal(number, lambda signum, frame: event.set())
    try:
        server.start()
        if args.offline:
            server.set_online(False)
        ready = json.dumps(
            {
                "url": server.url,
                "admin_url": server.admin_url if not args.no_admin else None,
                "pid": os.getpid(),
            }
        )
        if args.ready_file:
            _write_atomically(args.ready_file, ready + "\n")
        print(ready, flush=True)
        if use_sigwait:
            signal.sigwait(_STOP_SIGNALS)
        elif previous:
            # Without sigwait (Windows) the handler only runs between bytecodes.
            while not event.wait(0.5):
                pass
        else:
            event.wait()
    finally:
        server.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_arg_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
