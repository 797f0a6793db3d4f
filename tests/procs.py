"""Process helpers for the real-server tests: by pid, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(ppid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        found.add(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Stop a process this test started: ``sig``, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def kill_if(pid: int, marker: str) -> None:
    """SIGKILL ``pid`` if it is still a process whose command line holds ``marker``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker.encode() in f.read():
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A private tmpfs of ``size`` (e.g. "64k"), for a full disk; needs root (the test
    machine runs the suite as root); unmounted afterwards."""
    if os.geteuid() != 0:
        raise RuntimeError("mounting a tmpfs needs root (the test machine runs the suite as root)")
    mnt = Path(tempfile.mkdtemp(prefix="smp-fs-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def get_pid(session: object, url: str) -> int | None:
    """GET ``url`` from a test app that answers its worker's pid; None without an answer."""
    import requests

    assert isinstance(session, requests.Session)
    try:
        resp = session.get(url, timeout=5)
    except requests.RequestException:
        return None
    return int(resp.text) if resp.status_code == 200 else None
