"""A channel: the private runtime directory that joins workers to one publisher.

The directory holds the publisher's Unix socket, the authkey file and the
election lock file. It is created 0700 and refused when it is a symlink, owned
by another user, or open to group or world; the socket and the authkey are
0600. Election: the publisher process takes the lock file without blocking
and holds it for its whole life; the OS frees it when the process dies, even
by SIGKILL, so the next client that cannot reach a publisher starts another.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .config import Config
from .errors import ChannelError
from .ipc import IPCError, TimedConnection, connect

__all__ = ["Channel"]

log = logging.getLogger("samsara_mp")

_AUTHKEY_BYTES = 32
_PUBLISHER_MAIN = "import sys; from samsara_mp.publisher import main; sys.exit(main())"
_MAX_SOCKET_PATH = 100


def _base_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "samsara_mp"
    return Path(tempfile.gettempdir()) / f"samsara_mp-{os.geteuid()}"


def _ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700 if absent; refuse it unless it is ours and private."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ChannelError(f"cannot create runtime directory {path}: {exc}") from exc
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ChannelError(f"runtime directory {path} is a symlink; refusing it")
    if not stat.S_ISDIR(st.st_mode):
        raise ChannelError(f"runtime directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise ChannelError(
            f"runtime directory {path} is owned by uid {st.st_uid}, not {os.geteuid()}; refusing it"
        )
    if st.st_mode & 0o077:
        raise ChannelError(
            f"runtime directory {path} has mode {stat.S_IMODE(st.st_mode):o}; "
            "it must not be open to group or others (0700)"
        )


class Channel:
    """Paths, authkey, election lock and connection of one channel."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.channel_name
        self.dir = _base_dir(config.runtime_dir) / self.name
        self.socket_path = str(self.dir / "publisher.sock")
        self.authkey_path = self.dir / "authkey"
        self.lock_path = self.dir / "publisher.lock"
        self.info_path = self.dir / "publisher.json"
        if len(self.socket_path.encode()) > _MAX_SOCKET_PATH:
            raise ChannelError(
                f"socket path {self.socket_path} is too long for a Unix socket; "
                "set runtime_dir to a shorter directory"
            )

    def ensure_dir(self) -> None:
        """Create and check the runtime directory and its parent."""
        base = self.dir.parent
        if self.config.runtime_dir is None:
            _ensure_private_dir(base)
        else:
            base.mkdir(parents=True, exist_ok=True)
        _ensure_private_dir(self.dir)

    # ---- authkey ----
    def read_authkey(self) -> bytes | None:
        """The channel's authkey, or None when no publisher has made one yet."""
        try:
            fd = os.open(self.authkey_path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ChannelError(f"cannot read authkey {self.authkey_path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ChannelError(f"authkey {self.authkey_path} is not private (0600, ours)")
            data = os.read(fd, 1024)
        finally:
            os.close(fd)
        return data if len(data) == _AUTHKEY_BYTES else None

    def ensure_authkey(self) -> bytes:
        """Read the authkey, or create 32 random bytes 0600 (publisher side)."""
        key = self.read_authkey()
        if key is not None:
            return key
        key = secrets.token_bytes(_AUTHKEY_BYTES)
        tmp = self.dir / f".authkey.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.authkey_path)
        return key

    # ---- election ----
    def try_lock(self) -> FileLock | None:
        """Take the election lock without blocking; None when someone holds it."""
        lock = FileLock(str(self.lock_path), timeout=0, mode=0o600)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock

    def lock_is_free(self) -> bool:
        lock = self.try_lock()
        if lock is None:
            return False
        lock.release()
        return True

    def write_info(self, info: dict[str, Any]) -> None:
        tmp = self.dir / f".publisher.json.{os.getpid()}"
        tmp.write_text(json.dumps(info))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.info_path)

    def read_info(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return None
        return data

    # ---- connecting ----
    def connect(self, timeout: float) -> TimedConnection:
        """Connect to the live publisher, or raise ``IPCError``."""
        key = self.read_authkey()
        if key is None:
            raise IPCError(2, f"no publisher has started on channel {self.name}")
        return connect(self.socket_path, key, timeout)

    def spawn_publisher(
        self,
        owner_pid: int | None = None,
        idle_timeout: int | None = None,
        log_path: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a publisher process of its own; it exits at once if another holds the lock."""
        self.ensure_dir()
        cfg = self.config.to_dict()
        if idle_timeout is not None:
            cfg["idle_timeout"] = idle_timeout
        args = [_python_executable(), "-c", _PUBLISHER_MAIN, "--config", json.dumps(cfg)]
        if owner_pid is not None:
            args += ["--owner-pid", str(owner_pid)]
        err_path = log_path or str(self.dir / "publisher.log")
        with open(err_path, "ab") as err:
            os.chmod(err_path, 0o600)
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                close_fds=True,
                start_new_session=True,
                env=_child_env(),
            )
        # Reap it when it ends, so a long-lived worker never keeps a zombie.
        threading.Thread(target=proc.wait, name="samsara-mp-reaper", daemon=True).start()
        return proc

    def wait_connectable(self, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
        """Poll (bounded) until a publisher answers; False on deadline or early exit."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while time.monotonic() < deadline:
            try:
                conn = self.connect(min(1.0, max(deadline - time.monotonic(), 0.01)))
            except IPCError:
                if proc is not None and proc.poll() is not None and not self.lock_is_free():
                    proc = None  # it lost the election; the winner may still be starting
                elif proc is not None and proc.poll() is not None:
                    return False
            else:
                conn.close()
                return True
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        return False


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
    return shutil.which("python3") or exe


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The package must import in the child exactly as it does here.
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
