"""What ``SamsaraClient.stats()`` returns: this process's counts, and the channel's as its
publisher counts them plus what this process holds and has not reported yet
(docs/design.md, "Accounting")."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import process
from .errors import ChannelError
from .ipc import IPCError

if TYPE_CHECKING:
    from .client import SamsaraClient

__all__ = ["client_stats"]

_IPC_ERRORS = (IPCError, ChannelError, EOFError, OSError)


def client_stats(client: SamsaraClient, timeout: float, held: bool, ask: bool = True) -> dict[str, Any]:
    """A client's own counts, and the channel's from its publisher with what this process
    holds and has not reported added, so that every event is counted once. ``held``: the
    caller holds the link, so no push lands between the two readings."""
    staging = client._staging
    shipper = client._shipper
    with staging.lock:
        push = shipper.pending
        pending = len(push.payloads) if push is not None else 0
        local: dict[str, Any] = {
            "recorded": staging.recorded,
            "staged": len(staging) + pending,
            "staged_bytes": staging.nbytes,
            "dropped_staging": staging.dropped,
            "discarded": client.discarded,
            # Never staged, so not in recorded: see README, "Filtering, sampling and tests".
            "filtered": staging.filtered + client._steps.direct_filtered,
            "sampled_out": staging.sampled_out + client._steps.direct_sampled_out,
            "before_send_errors": client._steps.before_send_errors,
            "disabled": client._steps.disabled_events,
            "threaded": client.threaded,
            "shipper_alive": shipper.thread is not None and shipper.thread.is_alive(),
            "shipper_errors": shipper.thread_errors,
            "credit": shipper.credit,
            "pid": os.getpid(),
            "channel": client.channel.name,
        }
        totals = shipper.totals()
        totals_abs = shipper.staging.totals()
        reported_abs = shipper.reported_abs
    result: dict[str, Any] = {"local": local, "channel": None}
    if not ask:
        return result
    if client.config.disabled or process.capturing():
        result["error"] = "disabled" if client.config.disabled else "capturing"
        return result
    answer: Any = None
    try:
        answer, peer = client._link.call("stats", shipper.client_id, timeout=timeout, held=held,
                                         with_peer=True)
        chan = dict(answer)
    except (TypeError, ValueError):
        result["error"] = f"the publisher answered stats with a {type(answer).__name__}, not counters"
        return result
    except _IPC_ERRORS as exc:
        cause = client.channel.last_failure()
        result["error"] = str(exc) + (f" (the last publisher said: {cause})" if cause else "")
        return result
    mine = chan.pop("client", None) or {}
    if peer != shipper.instance:
        # A publisher the shipper has not pushed to yet counts from its own start: it is to
        # be told what the last one was not (the shipper's base when it meets it).
        totals = (totals_abs[0] - reported_abs[0], totals_abs[1] - reported_abs[1],
                  totals_abs[2] - reported_abs[2])
    if push is not None and push.sent and mine.get("last_seq", -1) >= push.seq:
        # The push in flight at the snapshot reached the ring (its answer was lost,
        # or is being read): what it took is the ring's now, not staged here.
        local["staged"] -= min(int(mine.get("last_taken", pending)), pending)
    # What the publisher has not been told yet, as it would count it.
    told = (mine.get("dropped_staging", 0), mine.get("filtered", 0), mine.get("sampled_out", 0))
    untold = [max(now - then, 0) for now, then in zip(totals, told, strict=True)]
    chan["recorded"] += local["staged"] + untold[0]
    chan["dropped_staging"] += untold[0]
    chan["dropped_overflow"] += untold[0]
    chan["filtered"] += untold[1]
    chan["sampled_out"] += untold[2]
    chan["staged"] = local["staged"]
    result["channel"] = chan
    return result
