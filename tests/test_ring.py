"""The ring: drop-oldest bound, the in-flight slot, idempotent pushes, exact accounting."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from samsara_mp.ledger import unaccounted
from samsara_mp.ring import Batch, Ring


def ev(i: int) -> bytes:
    return b'{"i":%d}' % i


def balanced(buf: Ring) -> bool:
    return unaccounted({**buf.snapshot(), "staged": 0}) == 0


def take(buf: Ring, count: int = 10**6, nbytes: int = 10**9) -> Batch:
    batch = buf.take(count, nbytes)
    assert batch is not None
    return batch


def all_left(buf: Ring) -> list[bytes]:
    """What is buffered, in order, without changing it."""
    flight = buf.in_flight.payloads if buf.in_flight is not None else []
    return list(flight) + list(buf._ring)


def test_overflow_drops_oldest_and_counts() -> None:
    buf = Ring(max_size=5)
    buf.push([ev(i) for i in range(8)])  # no client: the publisher's own, drop-oldest
    assert take(buf).payloads == [ev(i) for i in range(3, 8)]
    s = buf.snapshot()
    assert s["dropped_buffer"] == 3 and s["dropped_overflow"] == 3 and s["buffered"] == 5
    assert balanced(buf)


def test_a_client_push_takes_only_what_fits_and_says_the_room_left() -> None:
    buf = Ring(max_size=100)
    assert buf.push([ev(i) for i in range(150)], "c", 1) == (100, 0)
    s = buf.snapshot("c")
    assert s["dropped_buffer"] == 0 and s["refused_events"] == 50 and s["recorded"] == 100
    assert s["client"]["taken"] == 100 and s["client"]["room"] == 0 and balanced(buf)


def test_take_respects_count_and_bytes_but_takes_one_at_least() -> None:
    for count, nbytes, expect in ((3, 10**6, 3), (100, 25, 2), (100, 1, 1)):
        buf = Ring(max_size=100)
        buf.push([b"x" * 10] * 10)
        batch = take(buf, count, nbytes)
        assert len(batch.payloads) == expect and batch.full
        assert batch.nbytes == 10 * expect


def test_the_batch_in_flight_is_sent_again_until_settled() -> None:
    buf = Ring(max_size=100)
    buf.push([ev(i) for i in range(10)])
    batch = take(buf, 6)
    assert take(buf, 6) is batch  # not settled: the same batch again
    buf.settle(batch, delivered=[0, 1, 2], rejected=[4])
    again = take(buf)
    assert again.payloads == [ev(3), ev(5)] and again.first_seq == 3  # the rest of it, first
    s = buf.snapshot()
    assert (s["delivered"], s["rejected"], s["buffered"], s["in_flight"]) == (3, 1, 6, 2)
    assert balanced(buf)
    buf.settle(again, [0, 1], [])
    assert take(buf).payloads == [ev(i) for i in range(6, 10)]


def test_whole_batches_delivered_leave_the_rest_in_order_with_its_bytes() -> None:
    buf = Ring(max_size=100)
    buf.push([ev(i) for i in range(20)])
    for size, budget in ((5, 10**6), (100, 30), (100, 10**6)):  # ring longer, byte budget, all
        batch = take(buf, size, budget)
        assert batch.nbytes == sum(map(len, batch.payloads))
        buf.settle(batch, delivered=range(len(batch.payloads)), rejected=[])
        left = all_left(buf)
        assert left == [ev(i) for i in range(20 - len(left), 20)]
        assert buf.snapshot()["buffered_bytes"] == sum(map(len, left))
    s = buf.snapshot()
    assert (s["delivered"], s["buffered"], s["buffered_bytes"]) == (20, 0, 0) and balanced(buf)
    assert buf.oldest_age() == 0.0


def test_a_retried_push_is_taken_once() -> None:
    buf = Ring(max_size=100)
    assert buf.push([ev(1)], "c", 1, (0, 0, 0))[0] == 1
    assert buf.push([ev(1)], "c", 1, (0, 0, 0))[0] == 1  # the same answer, nothing taken again
    buf.push([ev(2)], "c", 2, (2, 0, 0))
    buf.push([ev(3)], "c", 3, (2, 0, 0))  # totals are cumulative: not counted twice
    s = buf.snapshot()
    assert s["buffered"] == 3 and s["recorded"] == 5 and s["duplicate_pushes"] == 1
    assert s["dropped_staging"] == 2 and balanced(buf)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 30), st.integers(0, 3)),
        st.tuples(st.just("send"), st.integers(1, 20), st.integers(0, 2**20)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(max_size=st.integers(1, 40), script=ops)
def test_accounting_always_adds_up(max_size: int, script: list[tuple[str, int, int]]) -> None:
    buf = Ring(max_size=max_size)
    counter = dropped = seq = 0
    for op, a, b in script:
        if op == "push":
            dropped += b
            seq += 1
            taken, _room = buf.push([ev(counter + i) for i in range(a)], "w", seq, (dropped, 0, 0))
            counter += taken  # what was not taken stays with the worker, outside the ring
        elif buf.in_flight is None:
            if len(buf):
                take(buf, a)
        else:
            batch = buf.in_flight
            n = len(batch.payloads)
            delivered = [i for i in range(n) if (b >> (2 * i)) & 3 == 1]
            rejected = [i for i in range(n) if (b >> (2 * i)) & 3 == 2]
            buf.settle(batch, delivered, rejected)
        assert balanced(buf)
        assert len(buf) <= max_size
        left = all_left(buf)
        assert buf.snapshot()["buffered_bytes"] == sum(map(len, left))
        # Order is kept: what remains is increasing, and nothing is dropped past the room given.
        nums = [int(p[5:-1]) for p in left]
        assert nums == sorted(nums)
        assert buf.snapshot()["dropped_buffer"] == 0


def test_remembered_clients_are_bounded_oldest_first(monkeypatch: Any) -> None:
    import samsara_mp.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "MAX_REMEMBERED_CLIENTS", 3)
    buf = Ring(max_size=100)
    for name in ("a", "b", "c"):
        buf.push([ev(1)], name, 1)
    batch = take(buf)
    buf.settle(batch, range(3), [])  # nothing held: any of them may be forgotten
    buf.push([ev(2)], "a", 2)  # "a" is now the most recent
    buf.push([ev(3)], "d", 1)  # forgets "b", the oldest
    assert buf.snapshot()["clients_seen"] == 3
    buf.push([ev(4)], "a", 2)  # still remembered: ignored
    assert buf.snapshot()["duplicate_pushes"] == 1
