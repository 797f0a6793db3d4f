"""The publisher process: holds the channel's lock, serves the buffer, runs the loop.

Exactly one per channel. It takes the election lock without blocking (and
exits with status 3 when another process holds it), serves the ring to
workers over the channel's Unix socket, runs the publish loop, and on
SIGTERM/SIGINT, the end of its owner, or a long idle spell with no clients,
stops taking pushes, drains within ``shutdown_timeout`` and writes what the
API did not take in time to the segment log, which the next publisher sends
first. :class:`Publisher` is the owner's handle on it (docs/design.md).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._launch import clear_status, read_config_fd, write_status
from ._owner import Publisher
from ._procfs import process_running
from ._redact import redact_url
from ._segment_log import SegmentLog
from .channel import EXIT_LOST_ELECTION, Channel, Flock, ensure_private_dir
from .config import Config
from .errors import ChannelError, InvalidConfiguration
from .hooks import OutcomeHooks
from .ipc import IPCError, ProtocolViolation, Server
from .publish_loop import PublishLoop
from .retry import RetryPolicy
from .ring import Ring
from .stats import ClientStatsReporter
from .supervise import Supervisor

if TYPE_CHECKING:
    pass

__all__ = ["Publisher", "PublisherProcess", "main", "EXIT_LOST_ELECTION"]

log = logging.getLogger("samsara_mp")

# How long a push that finds no room waits for a batch to leave the ring before it is
# answered; well within a worker's ipc_timeout.
_ROOM_WAIT = 0.1


class PublisherProcess:
    """What runs inside the publisher process."""

    def __init__(self, config: Config, owner_pid: int | None = None, gate_fd: int | None = None) -> None:
        self.config = config
        self.owner_pid = owner_pid
        # The spawn gate its launcher held, inherited: let go once serving.
        self.gate = Flock(gate_fd) if gate_fd is not None else None
        self.channel = Channel(config)
        self.buffer = Ring(config.max_buffer_size)
        self.hooks = OutcomeHooks(config.on_success, config.on_failure)
        self.loop = PublishLoop(self.buffer, config, on_outcome=self.hooks)
        self.reporter = ClientStatsReporter(config) if config.send_client_stats else None
        self._stats_events = 0
        self.spool_dir = Path(config.spool_dir or self.channel.dir / "spool")
        self._stop = threading.Event()
        self.supervisor = Supervisor(self._stop, RetryPolicy.from_config(config))
        self._accepting = True
        self._spooled_at_exit = False  # what flushes wait for went to the spool, not the API
        self._lost_at_exit = False  # some of it could not be written to the spool either
        # This start's identity, in every push's answer: a client's flush tells by it
        # which publisher holds its events (a pid can be reused, or be 1 in a container).
        self.instance = os.urandom(8).hex()
        self._started = time.time()
        self._server: Server | None = None
        self._metrics: Any = None  # the /metrics HTTP server, when metrics_port is set

    def _start_metrics(self) -> None:
        cfg = self.config
        if not cfg.metrics_port:
            return
        from .metrics import serve

        try:
            self._metrics = serve(cfg.metrics_host, cfg.metrics_port, self.stats, self.channel.name)
        except (OSError, ImportError) as exc:
            # Publishing matters more than its metrics: serve on without them.
            log.error("samsara_mp: cannot serve metrics on %s:%d: %s", cfg.metrics_host,
                      cfg.metrics_port, exc)
        else:
            log.info("samsara_mp: Prometheus metrics on http://%s:%d/metrics", cfg.metrics_host,
                     cfg.metrics_port)

    def _release_gate(self) -> None:
        if self.gate is not None:
            self.gate.forget()  # closing the last descriptor of the open file frees the flock

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve until stopped; the process's exit status."""
        # The spawn gate, if any, goes with this process whatever happens.
        self.channel.ensure_dir()
        lock = self.channel.try_lock()
        if lock is None:
            self._release_gate()
            log.info("samsara_mp: channel %s already has a publisher", self.channel.name)
            return EXIT_LOST_ELECTION
        try:
            return self._serve()
        finally:
            self._release_gate()
            try:
                self.channel.info_path.unlink()
            except FileNotFoundError:
                pass
            lock.release()

    def _serve(self) -> int:
        if not self.config.verify:
            # Said at every start, not once: whoever reads this publisher's log must see it.
            log.warning("samsara_mp: verify=False: the API's TLS certificate is not checked; "
                        "anyone on the path can read and change the events")
        key = self.channel.ensure_authkey()
        try:
            os.unlink(self.channel.socket_path)  # a dead publisher's; we hold the lock
        except FileNotFoundError:
            pass
        # Written before the socket listens: whoever can connect to this publisher can
        # also find its pid (to stop it, or to tell it from another).
        self.channel.write_info(
            {"pid": os.getpid(), "started_at": self._started, "channel": self.channel.name,
             "url": redact_url(self.config.url), "owner_pid": self.owner_pid}
        )
        self._restore_spool()
        server = Server(self.channel.socket_path, key, self._answer)
        self._server = server
        self._accept = self.supervisor.thread("samsara-mp-accept", server.serve_forever)
        self.loop.start()
        self._start_metrics()
        self._release_gate()
        clear_status(self.channel.dir)
        log.info("samsara_mp: publisher %d serving channel %s", os.getpid(), self.channel.name)
        idle_since = time.monotonic()
        next_report = time.monotonic() + self.config.stats_interval / 1000.0
        while not self._stop.wait(0.2):
            # Report only while there is something to report on, so an idle
            # publisher stays idle and can exit.
            if (self.reporter is not None and time.monotonic() >= next_report
                    and (server.clients or len(self.buffer))):
                next_report = time.monotonic() + self.config.stats_interval / 1000.0
                self.supervisor.guard("stats reporter", self._report)
            if self.loop.failed or self.supervisor.failed:
                # A thread that cannot go on: hand the channel over to a fresh publisher.
                log.error("samsara_mp: %s cannot go on; this publisher exits so that another "
                          "is elected", self.supervisor.failed or "the publish loop")
                self._shutdown()
                return 1
            if self.owner_pid is not None and not process_running(self.owner_pid, None):
                log.info("samsara_mp: owner %d ended; draining", self.owner_pid)
                break
            if server.clients or len(self.buffer) or self.buffer.spool_pending():
                idle_since = time.monotonic()
            elif self.config.idle_timeout and time.monotonic() - idle_since >= self.config.idle_timeout_s:
                log.info("samsara_mp: idle with no clients; exiting")
                break
        self._shutdown()
        return 0

    def _report(self) -> None:
        # Only into room no worker was given: a stats event must never push out theirs.
        if self.reporter is not None and len(self.buffer) < self.config.max_buffer_size:
            self.buffer.push([self.reporter.event(self.stats())])
            self._stats_events += 1

    def _shutdown(self) -> None:
        self._accepting = False
        drained = self.loop.drain(self.config.shutdown_timeout_s)
        if not drained:
            self._spooled_at_exit = True  # set first: a flush it wakes must see it
            self._write_left()
        self.buffer.close_spool()
        if self.buffer.spool_pending():
            log.warning("samsara_mp: %d bytes of undelivered events left in %s for the next publisher",
                        self.buffer.spool.nbytes if self.buffer.spool else 0, self._log_dir())
        if self._server is not None:
            self._server.close()
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
        # The last word on this publisher's accounting, for whoever reads its log.
        log.info("samsara_mp: final accounting %s", json.dumps(self._accounting()))
        # Nothing it held is lost: a client's flush need not call it lost. (A push taken
        # after the drain's last look would still be in memory.)
        if not len(self.buffer) and not self._lost_at_exit:
            self.channel.note_clean_exit(self.instance)

    def _log_dir(self) -> Path:
        return self.spool_dir / "outage"

    def _open_log(self) -> SegmentLog:
        """The segment log, opened (taking over what an earlier publisher left)."""
        spool = self.buffer.spool
        if spool is None:
            spool = SegmentLog(self._log_dir(), self.config.spool_max_bytes)
            spool.open()
        return spool

    def _write_left(self) -> None:
        """What the drain could not deliver goes to the segment log, for the next publisher."""
        n = len(self.buffer)
        if not n:
            return
        error: str | None
        try:
            spool = self._open_log()
        except (OSError, ChannelError) as exc:
            written, error = self.buffer.drain_to(None)[0], str(exc)
        else:
            written, failure = self.buffer.drain_to(spool)
            error = None if failure is None else str(failure)
        if written < n:
            self._lost_at_exit = True
            log.error("samsara_mp: could not write %d undelivered events to %s (%s); counted as "
                      "dropped_spool", n - written, self._log_dir(), error or "past spool_max_bytes")
        if written:
            log.warning("samsara_mp: wrote %d undelivered events to %s", written, self._log_dir())

    def _accounting(self) -> dict[str, int]:
        snap = self.stats()
        keys = ("recorded", "delivered", "dropped_overflow", "rejected", "buffered", "spooled",
                "dropped_spool", "restored", "spool_pending", "spool_errors", "spool_corrupt")
        return {k: int(snap.get(k, 0)) for k in keys}

    def _restore_spool(self) -> None:
        """Open the segment log to write (overflow="spool"), or to read what an earlier
        publisher left: the publish loop sends it first, a batch at a time."""
        try:
            self.spool_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # ensure_private_dir says what is wrong
        ensure_private_dir(self.spool_dir, "spool directory")
        if self.config.overflow == "spool" or any(self._log_dir().glob("seg-*.smp")):
            self.buffer.attach_spool(self._open_log(), self.config.overflow)

    # ---- IPC ----
    def _answer(self, method: str, args: tuple[Any, ...]) -> Any:
        """One request of a worker, its arguments checked before they touch the ring."""
        if method == "push":
            payloads, client_id, seq, totals = _push_args(args)
            if not self._accepting:
                raise ChannelError("publisher is shutting down")
            taken, room = self.buffer.push(payloads, client_id, seq, totals, wait=_ROOM_WAIT)
            return taken, room, self.instance
        if method == "stats":
            return self.stats(_opt_str(args))
        if method == "flush":
            if not args or type(args[0]) not in (int, float) or not 0 <= args[0] < float("inf"):
                raise ProtocolViolation("flush takes a timeout in seconds")
            target = self.loop.request_flush()
            done = self.loop.wait_flushed(target, min(float(args[0]), 3600.0))
            snap = self.buffer.snapshot(_opt_str(args[1:]))
            client = snap.get("client") or {}
            # Events of this client that went to disk share the disk's losses: which of
            # the spool's dropped events were its own is not kept.
            lost = int(client.get("lost", 0)) + (snap["dropped_spool"] if client.get("spilled") else 0)
            return done and not self._spooled_at_exit, lost
        if method == "instance":
            return self.instance
        if method == "ping":
            return os.getpid()
        raise ProtocolViolation(f"unknown method {method[:40]!r}")

    def stats(self, client_id: str | None = None) -> dict[str, Any]:
        """The channel's counters; with a client's id, also the last push seq taken
        from it (``client_last_push``, in the same snapshot), which tells a client
        whether its push in flight has landed."""
        snap = self.buffer.snapshot(client_id)
        snap.update(
            {k: v for k, v in self.loop.stats.items() if k != "statuses"},
            statuses={str(k): v for k, v in self.loop.stats["statuses"].items()},
            stats_events=self._stats_events,
            publisher_pid=os.getpid(),
            uptime_s=time.time() - self._started,
            connected_clients=self._server.clients if self._server else 0,
            protocol_errors=self._server.protocol_errors if self._server else 0,
            loop_alive=self.loop.alive,
            hook_errors=self.hooks.errors,
            loop_errors=self.loop.supervisor.errors + self.supervisor.errors,
            oldest_buffered_age_s=round(self.buffer.oldest_age(), 3),
            stale=self._stale(),
            channel=self.channel.name,
            url=redact_url(self.config.url),
        )
        return snap

    def _stale(self) -> bool:
        """Events have waited longer than three publish intervals and a request's timeout
        without a delivery: the API is failing, or the loop is stuck."""
        limit = 3 * self.config.publish_interval_s + self.config.send_timeout_s
        last = self.loop.stats["last_success_at"]
        return bool(len(self.buffer) and self.buffer.oldest_age() > limit
                    and (last is None or time.time() - last > limit))


def _push_args(args: tuple[Any, ...]) -> tuple[list[bytes], str, int, tuple[int, int, int]]:
    """A push's arguments, or TypeError saying what is wrong: a malformed push from a
    peer must be refused, never reach the ring or a counter."""
    if len(args) != 4:
        raise ProtocolViolation(f"push takes 4 arguments, not {len(args)}")
    payloads, client_id, seq, totals = args
    if type(payloads) is not list or not all(type(p) is bytes for p in payloads):
        raise ProtocolViolation("push: payloads must be a list of bytes")
    if type(client_id) is not str or type(seq) is not int:
        raise ProtocolViolation("push: client id must be a str and seq an int")
    if (type(totals) is not tuple or len(totals) != 3
            or not all(type(t) is int and t >= 0 for t in totals)):
        raise ProtocolViolation("push: totals must be three counts")
    return payloads, client_id, seq, totals


def _opt_str(args: tuple[Any, ...]) -> str | None:
    return args[0] if args and isinstance(args[0], str) else None


_USAGE = "usage: python -m samsara_mp.publisher --config-fd N [--owner-pid PID] [--gate-fd N]"
_OPTIONS = ("--config-fd", "--owner-pid", "--gate-fd")


def _parse_args(argv: list[str]) -> dict[str, int]:
    """The three integer options a launcher passes (argparse would add ~4 ms to each start).

    ``--config-fd``: an inherited pipe holding the Config as JSON (never argv: it
    holds secrets); ``--owner-pid``: end with that process; ``--gate-fd``: the spawn
    gate to let go once serving."""
    out: dict[str, int] = {}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name not in _OPTIONS:
            raise SystemExit(f"{_USAGE}\nunknown argument: {name}")  # never its value
        if not eq:
            value = next(it, "")
        try:
            out[name[2:].replace("-", "_")] = int(value)
        except ValueError:
            raise SystemExit(f"{_USAGE}\n{name} needs an integer, not {value!r}") from None
    if "config_fd" not in out:
        raise SystemExit(f"{_USAGE}\n--config-fd is required")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s samsara_mp publisher[%(process)d] %(levelname)s %(message)s",
    )
    proc: PublisherProcess | None = None
    try:
        config = Config.build(env={}, **read_config_fd(args["config_fd"]))
        proc = PublisherProcess(config, owner_pid=args.get("owner_pid"), gate_fd=args.get("gate_fd"))
        signal.signal(signal.SIGTERM, proc.request_stop)
        signal.signal(signal.SIGINT, proc.request_stop)
        code = proc.run()
        if code == 1:
            write_status(proc.channel.dir, "the publish loop could not go on (see publisher.log)")
        return code
    except Exception as exc:  # noqa: BLE001 - said in the log, and to whoever waits on the start
        known = isinstance(exc, ChannelError | IPCError | OSError | InvalidConfiguration)
        reason = str(exc) if known else f"{type(exc).__name__}: {exc}"
        log.error("samsara_mp: publisher failed: %s", reason, exc_info=not known)
        if proc is not None:
            write_status(proc.channel.dir, reason)  # Channel.last_failure() reads it
        return 1


if __name__ == "__main__":
    sys.exit(main())
