"""A channel: the private runtime directory that joins workers to one publisher.

The directory holds the publisher's Unix socket, the authkey file and the
election lock file. It is created 0700 and refused when it is a symlink, owned
by another user, or open to group or world; the socket and the authkey are
0600. Election: the publisher process takes the lock file without blocking
and holds it for its whole life; the OS frees it when the process dies, even
by SIGKILL, so the next client that cannot reach a publisher starts another.

A spawn gate beside it keeps a cold start to one launch: a process launches a
publisher only while it holds ``spawn.lock`` (taken without blocking) and
finds the election lock free; the launched process inherits the gate and
lets it go once it serves (or exits), so when 64 processes start at once on
a cold channel one of them launches and the others wait for it.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._launch import Detached, ProcHandle, read_status, spawn_detached
from .config import Config
from .errors import ChannelError
from .ipc import Connection, IPCError, connect

if TYPE_CHECKING:
    pass

__all__ = ["Channel", "Detached", "Flock", "Launch", "ProcHandle", "EXIT_LOST_ELECTION", "ensure_private_dir"]

log = logging.getLogger("samsara_mp")

_AUTHKEY_BYTES = 32
_MAX_SOCKET_PATH = 100
# A publisher's exit status when another holds the channel's election lock.
EXIT_LOST_ELECTION = 3


class Flock:
    """An exclusive ``flock(2)`` on a file, held until :meth:`release` or the process's end.

    The OS frees it when its holder dies, even by SIGKILL. ``fcntl`` directly
    (what ``filelock``'s Unix lock calls): a lock here must be able to pass to
    a launched publisher with an inherited descriptor, since a flock belongs
    to the open file and not to the process, and the publisher's start, which
    a cold channel's first events wait for, is 15 ms shorter without
    ``filelock``'s import.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def take(cls, path: str | os.PathLike[str]) -> Flock | None:
        """Take the lock without blocking; None when another open file holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(fd)

    def release(self) -> None:
        """Let the lock go (it stays held where a copy of the descriptor lives on)."""
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.forget()

    def forget(self) -> None:
        """Close this descriptor only: a launched publisher's inherited copy keeps the lock."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class Launch(enum.Enum):
    """What :meth:`Channel.launch_publisher` found."""

    LAUNCHED = "launched"  # this call started a publisher process
    IN_FLIGHT = "in_flight"  # another process is launching one
    SERVING = "serving"  # a publisher holds the election lock (serving, or starting)


def _base_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "samsara_mp"
    import tempfile  # here: the publisher's start is cut by every import it skips

    return Path(tempfile.gettempdir()) / f"samsara_mp-{os.geteuid()}"


def _real_dir(path: Path, what: str) -> os.stat_result:
    """``lstat`` of ``path``; ``ChannelError`` unless it is a directory and no symlink."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ChannelError(f"{what} {path} is a symlink; refusing it")
    if not stat.S_ISDIR(st.st_mode):
        raise ChannelError(f"{what} {path} is not a directory")
    return st


def _refuse_foreign(path: Path, what: str, st: os.stat_result, open_bits: int, rule: str) -> None:
    if st.st_uid != os.geteuid():
        hint = ("; set runtime_dir (SAMSARA_MP_RUNTIME_DIR) to a directory of your own, or run "
                "with XDG_RUNTIME_DIR set" if what == "runtime directory" else "")
        raise ChannelError(
            f"{what} {path} is owned by uid {st.st_uid}, not {os.geteuid()}; refusing it{hint}"
        )
    if st.st_mode & open_bits:
        raise ChannelError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):o}; {rule}")


def ensure_private_dir(path: Path, what: str = "runtime directory") -> None:
    """Create ``path`` 0700 if absent; refuse it (``ChannelError`` naming it) unless it is
    a real directory (no symlink), ours, and closed to group and others."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ChannelError(f"cannot create {what} {path}: {exc}") from exc
    st = _real_dir(path, what)
    _refuse_foreign(path, what, st, 0o077, "it must not be open to group or others (0700)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ChannelError(f"{what} {path} is not writable")


def _check_configured_base(path: Path) -> None:
    """A configured ``runtime_dir`` holds the private channel directories: it must be a
    real directory (no symlink) that no one else can rename entries in, that is ours and
    not writable by group or others, or a sticky one such as /tmp."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ChannelError(f"cannot create runtime directory {path}: {exc}") from exc
    st = _real_dir(path, "runtime directory")
    if not st.st_mode & stat.S_ISVTX:  # sticky (/tmp): others cannot move our entries
        _refuse_foreign(path, "runtime directory", st, 0o022,
                        "it must not be writable by group or others")


_INSTANCE_RE = re.compile(r"[0-9a-f]{16}")


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
        self.ended_dir = self.dir / "ended"  # a mark per publisher that ended cleanly
        if len(self.socket_path.encode()) > _MAX_SOCKET_PATH:
            raise ChannelError(
                f"socket path {self.socket_path} is too long for a Unix socket; "
                "set runtime_dir to a shorter directory"
            )

    def ensure_dir(self) -> None:
        """Create and check the runtime directory and its parent."""
        base = self.dir.parent
        if self.config.runtime_dir is None:
            ensure_private_dir(base)
        else:
            _check_configured_base(base)
        ensure_private_dir(self.dir)

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
        key = os.urandom(_AUTHKEY_BYTES)
        tmp = self.dir / f".authkey.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.authkey_path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ChannelError(f"cannot write authkey {self.authkey_path}: {exc}") from exc
        return key

    # ---- election ----
    def try_lock(self) -> Flock | None:
        """Take the election lock without blocking; None when someone holds it."""
        return Flock.take(self.lock_path)

    def lock_is_free(self) -> bool:
        lock = self.try_lock()
        if lock is None:
            return False
        lock.release()
        return True

    def take_gate(self) -> Flock | None:
        """Take the spawn gate without blocking; None while another launch is in flight."""
        return Flock.take(self.dir / "spawn.lock")

    def launch_publisher(self) -> tuple[Launch, Detached | None]:
        """Launch a publisher unless one holds the lock or another launch is in flight.

        Never waits for the publisher: a process that only made a client
        starts no thread and does not block here beyond the fork and exec.
        """
        self.ensure_dir()
        gate = self.take_gate()
        if gate is None:
            return Launch.IN_FLIGHT, None
        try:
            if not self.lock_is_free():
                return Launch.SERVING, None
            proc = spawn_detached(self, gate_fd=gate.fd)
        finally:
            gate.forget()  # the publisher holds its inherited copy until it serves
        return Launch.LAUNCHED, proc

    def write_info(self, info: dict[str, Any]) -> None:
        tmp = self.dir / f".publisher.json.{os.getpid()}"
        tmp.write_text(json.dumps(info))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.info_path)

    def note_clean_exit(self, instance: str, keep: int = 1024) -> None:
        """Mark the publisher start ``instance`` as ended cleanly: it delivered,
        spooled or counted everything it held. A client's flush reads it to tell a
        restart or an idle exit from a kill (the newest ``keep`` marks are kept)."""
        try:
            self.ended_dir.mkdir(mode=0o700, exist_ok=True)
            (self.ended_dir / instance).touch()
            marks = list(self.ended_dir.iterdir())
            if len(marks) > keep:
                marks.sort(key=lambda p: p.stat().st_mtime_ns)
                for old in marks[:-keep]:
                    old.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("samsara_mp: could not mark the clean exit in %s: %s", self.ended_dir, exc)

    def ended_cleanly(self, instance: str) -> bool:
        return bool(_INSTANCE_RE.fullmatch(instance)) and (self.ended_dir / instance).exists()

    def read_info(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return None
        return data

    # ---- connecting ----
    def connect(self, timeout: float) -> Connection:
        """Connect to the live publisher, or raise ``IPCError``."""
        key = self.read_authkey()
        if key is None:
            raise IPCError(2, f"no publisher has started on channel {self.name}")
        return connect(self.socket_path, key, timeout)

    def last_failure(self) -> str | None:
        """Why the last publisher of this channel failed to start or serve, from the status
        file it wrote (None when the last one served, or none failed)."""
        return read_status(self.dir)

    def wait_connectable(self, timeout: float, proc: ProcHandle | None = None) -> bool:
        """Poll (bounded) until a publisher answers; False on deadline or early exit."""
        conn = self.connect_when_up(timeout, proc)
        if conn is None:
            return False
        conn.close()
        return True

    def connect_when_up(self, timeout: float, proc: ProcHandle | None = None) -> Connection | None:
        """Poll (bounded) until a publisher answers; its connection, or None on deadline or
        when ``proc`` ended without another publisher taking the channel.

        Each attempt gets up to 1 s for its handshake: a publisher that has
        just started may be slow to answer its first peers."""
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            try:
                return self.connect(min(1.0, max(deadline - time.monotonic(), 0.05)))
            except IPCError:
                if proc is not None and proc.poll() is not None and not self.lock_is_free():
                    proc = None  # it lost the election; the winner may still be starting
                elif proc is not None and proc.poll() is not None:
                    return None
            # A start takes ~60-100 ms: poll every 2 ms through it (a refused connect is
            # ~20 us), then every 10 ms for a publisher that is slow to come up.
            time.sleep(0.002 if time.monotonic() - start < 0.5 else 0.01)
        return None


