"""A batch: events taken together out of the ring or the segment log, to be sent and settled
(docs/design.md, "The ring and the in-flight slot")."""

from __future__ import annotations

from itertools import repeat
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._segment_log import Position
    from .ledger import ClientRecord

__all__ = ["Batch"]


class Batch:
    """Events taken out of the ring (or read from the spool) to send together.

    ``first_seq`` is the ring sequence number of the first event; ``owners``
    the runs of (client record, count) they came from; ``positions`` where each
    is on disk, for a batch read from the spool."""

    __slots__ = ("first_seq", "payloads", "owners", "nbytes", "full", "positions", "inherited", "ends")

    def __init__(self, first_seq: int, payloads: list[bytes], owners: list[list[Any]] | None = None,
                 nbytes: int | None = None, full: bool = False,
                 positions: list[Position] | None = None, inherited: list[bool] | None = None,
                 ends: dict[Position, int] | None = None) -> None:
        self.first_seq = first_seq
        self.payloads = payloads
        self.owners = owners or []
        self.nbytes = sum(map(len, payloads)) if nbytes is None else nbytes
        self.full = full
        self.positions = positions
        self.inherited = inherited
        self.ends = ends

    def __repr__(self) -> str:
        return f"Batch(first_seq={self.first_seq}, events={len(self.payloads)}, full={self.full})"

    def owner_list(self) -> list[ClientRecord | None]:
        """The owner of each event, in order."""
        out: list[ClientRecord | None] = []
        for rec, n in self.owners:
            out.extend(repeat(rec, n))
        return out
