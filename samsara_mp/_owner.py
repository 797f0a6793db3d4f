"""``Publisher``: an owner's handle on its channel's publisher process, to start it and to
stop it with a drain (a gunicorn master, a Celery main process, a Pool's parent; docs/design.md,
"Election and cold start")."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any

from ._launch import spawn_publisher
from .channel import EXIT_LOST_ELECTION, Channel
from .config import Config
from .errors import ChannelError, ChannelTaken
from .ipc import IPCError

if TYPE_CHECKING:
    import subprocess

__all__ = ["Publisher"]


class Publisher:
    """An owner's handle: start the channel's publisher process, and stop it with a drain.

    A gunicorn master, a Celery main process or a ``Pool``'s parent uses this so
    that workers only connect. The publisher also stops by itself when its
    owner process ends.
    """

    def __init__(self, config: Config | None = None, **kwargs: Any) -> None:
        self.config = config if config is not None else Config.build(**kwargs)
        self.channel = Channel(self.config)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 15.0) -> Publisher:
        """Start the channel's publisher and wait until it serves.

        Raises ``ChannelTaken`` (with the serving publisher's pid) when another
        publisher already serves the channel: this handle then owns nothing,
        and its ``stop()`` does nothing. Raises ``ChannelError`` when the
        publisher cannot start.
        """
        deadline = time.monotonic() + timeout
        proc = self._proc = spawn_publisher(self.channel, owner_pid=os.getpid(), idle_timeout=0)
        serving: int | None = None
        if self.channel.wait_connectable(timeout, proc):
            # Someone answers: ours, or one that held the channel before ours
            # tried its lock (then ours exits at once with EXIT_LOST_ELECTION).
            delay = 0.005
            while proc.poll() is None and time.monotonic() < deadline:
                serving = self._serving_pid(max(min(deadline - time.monotonic(), 2.0), 0.1))
                if serving == proc.pid:
                    return self
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        code = proc.poll()
        if code == EXIT_LOST_ELECTION:
            self._proc = None
            serving = serving or self._serving_pid(1.0)
            if serving is not None:
                raise ChannelTaken(self.channel.name, serving)
            raise ChannelError(
                f"channel {self.channel.name} is locked by a publisher that does not answer"
            )
        self.stop(timeout=1.0)
        self._proc = None
        cause = self.channel.last_failure()
        raise ChannelError(
            f"publisher for channel {self.channel.name} did not start (exit {code})"
            + (f": {cause}" if cause else "") + f"; see {self.channel.dir / 'publisher.log'}"
        )

    def _serving_pid(self, timeout: float) -> int | None:
        try:
            pid = self.stats(timeout)["publisher_pid"]
        except (IPCError, ChannelError, OSError, EOFError):
            return None
        return int(pid)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the publisher and wait for its drain; its exit status."""
        proc = self._proc
        if proc is None:
            return None
        if timeout is None:
            timeout = self.config.shutdown_timeout_s + self.config.send_timeout_s + 5.0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        import subprocess

        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5.0)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        conn = self.channel.connect(timeout)
        try:
            result: dict[str, Any] = conn.call("stats")
            return result
        finally:
            conn.close()

    def __enter__(self) -> Publisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
