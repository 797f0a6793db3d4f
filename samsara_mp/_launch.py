"""Launching a channel's publisher process: its command line (never a secret on it), the
pipe that carries its configuration, and the status file a failed start leaves for
whoever waits on it (docs/design.md, "Election and cold start")."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from ._procfs import process_running
from .config import WORKER_ONLY_KEYS
from .errors import ChannelError

if TYPE_CHECKING:
    import subprocess

    from .channel import Channel

__all__ = ["spawn_publisher", "spawn_detached", "read_config_fd", "ProcHandle", "Detached",
           "write_status", "read_status", "clear_status", "PUBLISHER_MAIN"]

PUBLISHER_MAIN = "import sys; from samsara_mp.publisher import main; sys.exit(main())"
_STATUS = "publisher.status"


def spawn_publisher(
    channel: Channel,
    owner_pid: int | None = None,
    idle_timeout: int | None = None,
    log_path: str | None = None,
    gate_fd: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a publisher process of its own, a child of this one (an owner waits for
    it in ``Publisher.stop``); it exits at once if another holds the lock."""
    import subprocess

    args, fds, config_fd = _publisher_args(channel, owner_pid, idle_timeout, gate_fd)
    try:
        with _log(channel, log_path) as err:
            return subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                close_fds=True, pass_fds=fds, start_new_session=True, env=_child_env(),
            )
    finally:
        os.close(config_fd)

def spawn_detached(channel: Channel, gate_fd: int | None = None) -> Detached:
    """Start a publisher that is not this process's child, so nothing here must reap it.

    A worker that launches the channel's publisher may live on long after
    it; without a reaper thread (a process that only made a client must
    stay single-threaded) a child would stay a zombie. ``/bin/sh`` starts
    it in the background and exits at once, which leaves it to init.
    """
    import subprocess

    args, fds, config_fd = _publisher_args(channel, None, None, gate_fd)
    try:
        with _log(channel, None) as err:
            sh = subprocess.Popen(
                ["/bin/sh", "-c", '"$@" </dev/null >/dev/null & echo $!', "sh", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                close_fds=True, pass_fds=fds, start_new_session=True, env=_child_env(),
            )
    finally:
        os.close(config_fd)
    try:
        out, _ = sh.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        sh.kill()
        sh.communicate()
        raise ChannelError(f"could not start a publisher for channel {channel.name}") from None
    try:
        return Detached(int(out.strip()))
    except ValueError:
        raise ChannelError(
            f"could not start a publisher for channel {channel.name} (sh exit {sh.returncode})"
        ) from None

def _publisher_args(
    channel: Channel, owner_pid: int | None, idle_timeout: int | None, gate_fd: int | None
) -> tuple[list[str], tuple[int, ...], int]:
    """The publisher's command line, the descriptors it inherits, and the read end of
    the pipe that carries its configuration (the caller closes it once started).

    The configuration never goes on the command line: ``/proc/<pid>/cmdline`` is
    readable by every local user, and the URL's credentials and ``headers`` are
    secrets. The publisher reads it from the inherited pipe and closes it."""
    channel.ensure_dir()
    cfg = channel.config.to_dict()
    cfg["channel"] = channel.name  # named, so the publisher need not hash the URL (hashlib)
    for key in WORKER_ONLY_KEYS:
        del cfg[key]  # the publisher never runs them, and need not import the app's code
    if idle_timeout is not None:
        cfg["idle_timeout"] = idle_timeout
    config_fd = _config_pipe(json.dumps(cfg).encode())
    args = [_python_executable(), "-c", PUBLISHER_MAIN, "--config-fd", str(config_fd)]
    if owner_pid is not None:
        args += ["--owner-pid", str(owner_pid)]
    fds: tuple[int, ...] = (config_fd,)
    if gate_fd is not None:
        args += ["--gate-fd", str(gate_fd)]
        fds += (gate_fd,)
    return args, fds, config_fd

def _log(channel: Channel, log_path: str | None) -> BinaryIO:
    err_path = log_path or str(channel.dir / "publisher.log")
    try:
        err = open(err_path, "ab")  # the caller closes it (with)
        os.chmod(err_path, 0o600)
    except OSError as exc:
        raise ChannelError(f"cannot open the publisher's log {err_path}: {exc}") from exc
    return err


class ProcHandle(Protocol):
    """A started publisher: a ``Popen`` or a :class:`Detached` one."""

    pid: int

    def poll(self) -> int | None: ...


class Detached:
    """A publisher that is not our child: ``poll()`` says only whether it still runs."""

    ENDED = -1

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        """None while it runs, ``Detached.ENDED`` once it has ended (its status is init's)."""
        return None if process_running(self.pid, None) else self.ENDED


def _config_pipe(data: bytes) -> int:
    """A pipe holding ``data`` and then EOF; its read end (a configuration is far
    smaller than a pipe's 64 KiB, so the write never blocks)."""
    r, w = os.pipe()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def read_config_fd(fd: int) -> dict[str, Any]:
    """Read and close the configuration pipe a publisher inherited."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data: dict[str, Any] = json.loads(b"".join(chunks))
    return data


def _python_executable() -> str:
    """The interpreter to run the publisher with.

    Under uWSGI ``sys.executable`` is the uwsgi binary; the interpreter of
    the same environment sits in ``sys.exec_prefix``.
    """
    exe = sys.executable
    if exe and os.path.basename(exe).startswith("python") and "uwsgi" not in sys.modules:
        return exe
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3", "python"):
        candidate = os.path.join(sys.exec_prefix, "bin", name)
        if os.access(candidate, os.X_OK):
            return candidate
    import shutil

    return shutil.which("python3") or exe


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The package must import in the child exactly as it does here.
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def write_status(directory: Path, reason: str) -> None:
    """Say why this publisher could not start or serve, for whoever launched it."""
    tmp = directory / f".{_STATUS}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"pid": os.getpid(), "error": reason[:500]}))
        os.chmod(tmp, 0o600)
        os.replace(tmp, directory / _STATUS)
    except OSError:
        pass  # the log has the reason too


def read_status(directory: Path) -> str | None:
    """The reason the channel's last publisher gave for failing, if it failed."""
    try:
        data = json.loads((directory / _STATUS).read_text())
        return str(data["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_status(directory: Path) -> None:
    """A publisher serves: no failure is the last word any more."""
    try:
        (directory / _STATUS).unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass
