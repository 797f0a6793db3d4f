"""What a flush waits for, and when it may say True.

A flush ships what is staged (waiting for room in the ring, within its
timeout), then asks the publisher to send everything it holds and waits. It
is True only when nothing this process recorded since the previous flush was
lost: no event dropped from its staging or from the ring for lack of room,
and the publisher that answers is the one that took its pushes (one that was
killed may have lost what it held). When that publisher is gone, the flush
still elects a new one and waits for what is on disk to be sent before it
answers (docs/design.md, "Flush").
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from ._procfs import process_running
from .errors import ChannelError
from .ipc import IPCError

if TYPE_CHECKING:
    from ._link import Link
    from ._shipper import Shipper
    from .channel import Channel
    from .ipc import Connection

__all__ = ["Holders", "Flush"]

log = logging.getLogger("samsara_mp")

_IPC_ERRORS = (IPCError, ChannelError, EOFError, OSError)


class Holder(NamedTuple):
    """A publisher that took pushes no flush has answered for yet."""

    number: int  # of the last push it took
    process: tuple[int, int | None] | None  # (pid, start time), when the system names it


class Holders:
    """The publishers, by instance id, holding pushes of this process not yet flushed."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Fresh state (and a fresh lock: one a parent's thread held at fork stays held)."""
        # An RLock: a signal handler may flush while the code it interrupted settles one.
        self.lock = threading.RLock()
        self.pushes_acked = 0
        self.peers: dict[str, Holder] = {}

    def took(self, conn: Connection, instance: str) -> None:
        """A push was taken by the publisher ``instance`` on ``conn``."""
        self.pushes_acked += 1
        if instance:
            with self.lock:
                self.peers[instance] = Holder(self.pushes_acked, conn.peer())

    def settle(self, channel: Channel, done: bool | None, peer: str | None, covers: int) -> list[str]:
        """After a flush answered ``done`` by ``peer`` for the pushes numbered up to
        ``covers``: forget the publishers it answers for and those that have ended;
        return those that ended without draining (killed), each as "pid N".
        One that ended cleanly left a mark in the channel's directory."""
        lost = []
        with self.lock:
            for instance, holder in list(self.peers.items()):
                if done and instance == peer:
                    if holder.number > covers:
                        continue  # pushed while it waited: the next flush's to answer for
                elif channel.ended_cleanly(instance):
                    pass
                elif holder.process is None:
                    pass  # the system names no process (another pid namespace): cannot tell
                elif process_running(*holder.process):
                    continue
                else:
                    lost.append(f"pid {holder.process[0]}")
                if self.peers.get(instance) == holder:  # not replaced by a newer push meanwhile
                    del self.peers[instance]
        return lost

    def unanswered(self, covers: int) -> bool:
        """Another publisher that took pushes up to ``covers`` still runs."""
        with self.lock:
            return any(h.number <= covers for h in self.peers.values())


class Flush:
    """One process's flushes, and the losses they have answered for."""

    def __init__(self, link: Link, shipper: Shipper) -> None:
        self.link = link
        self.shipper = shipper
        self.reset()

    def reset(self) -> None:
        self.seen_dropped = 0  # staging drops already answered for
        self.seen_lost: tuple[str, int] = ("", 0)  # (publisher, its ring drops of ours) answered for

    def urge(self, deadline: float, strict: bool = False) -> bool:
        """Ask the publisher to send now, without waiting for the delivery (a flush whose
        events wait for room while it waits out a backoff; a process's exit); ``strict``:
        the call itself ends by ``deadline``. True when it was asked."""
        try:
            return self.link.flush_call(deadline, None, wait=0.0, strict=strict) is not None
        except _IPC_ERRORS:
            return False

    def send_now(self, deadline: float) -> bool:
        """At the end of this process's work (its exit): when a publisher took pushes of
        it that no flush has answered for, ask it to send now instead of at its next
        ``publish_interval`` tick, without waiting for the delivery; every step is
        bounded by ``deadline``. True when it was asked."""
        if not self.shipper.holders.peers or time.monotonic() >= deadline:
            return False  # nothing of ours waits there: no connection at all
        return self.urge(deadline, strict=True)

    def wait(self, deadline: float, shipped: bool) -> bool:
        """The publisher's part of a flush, after the shipping (``shipped``: all went)."""
        link, shipper = self.link, self.shipper
        holders = shipper.holders
        client_id = shipper.client_id
        answer: Any = None
        peer: str | None = None
        covers = holders.pushes_acked
        lost: list[str] = []
        try:
            got = link.flush_call(deadline, client_id) if shipped else None
            if got is None and shipped:
                # No publisher answered: the one that held our pushes may be gone. Elect
                # one all the same, so that what is on disk is sent before we answer.
                lost = holders.settle(link.channel, None, None, 0)
                left = deadline - time.monotonic()
                if left > 0:
                    covers = holders.pushes_acked
                    got = link.call("flush", left, client_id, timeout=left + link.config.ipc_timeout_s,
                                    elect=True, deadline=deadline, with_peer=True)
            if got is not None:
                answer, peer = got
        except _IPC_ERRORS as exc:
            log.warning("samsara_mp: flush could not reach the publisher: %s",
                        str(exc) or type(exc).__name__)
        done, ring_lost = _parse(answer)
        lost += holders.settle(link.channel, done, peer, covers)
        if lost:
            # Said once (this flush is not done): the next answers for what follows.
            log.warning("samsara_mp: the publisher (%s) that took events of this flush ended "
                        "without draining; they may be lost", ", ".join(sorted(lost)))
        dropped = self._new_losses(peer, ring_lost)
        return bool(done) and shipped and not lost and not dropped and not holders.unanswered(covers)

    def _new_losses(self, peer: str | None, ring_lost: int | None) -> int:
        """Events of this process dropped for lack of room since the last flush."""
        staging_dropped = self.shipper.staging.dropped
        n = staging_dropped - self.seen_dropped
        self.seen_dropped = staging_dropped
        if peer and ring_lost is not None:
            before = self.seen_lost[1] if self.seen_lost[0] == peer else 0
            n += max(ring_lost - before, 0)
            self.seen_lost = (peer, ring_lost)
        if n:
            log.warning("samsara_mp: %d events of this process were dropped for lack of room "
                        "since the last flush (see stats(): dropped_staging, dropped_buffer)", n)
        return n


def _parse(answer: Any) -> tuple[bool | None, int | None]:
    """A publisher's flush answer, ``(done, events of this client its ring dropped)``;
    (None, None) when there was none, or it is not that."""
    try:
        done, lost = answer
        return bool(done), int(lost)
    except (TypeError, ValueError):
        return None, None
