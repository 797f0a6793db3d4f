"""SharedBuffer: drop-oldest bound, peek/commit, idempotent pushes, exact accounting."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from samsara_mp.buffer import SharedBuffer


def ev(i: int) -> bytes:
    return b'{"i":%d}' % i


def balanced(buf: SharedBuffer) -> bool:
    s = buf.snapshot()
    return s["recorded"] == s["delivered"] + s["dropped_overflow"] + s["rejected"] + s["buffered"]


def test_overflow_drops_oldest_and_counts() -> None:
    buf = SharedBuffer(max_size=5)
    assert buf.push([ev(i) for i in range(8)]) == 3
    assert buf.peek(100, 10**6).payloads == [ev(i) for i in range(3, 8)]
    s = buf.snapshot()
    assert s["dropped_overflow"] == 3 and s["buffered"] == 5 and balanced(buf)


def test_peek_respects_count_and_bytes_but_takes_one_at_least() -> None:
    buf = SharedBuffer(max_size=100)
    buf.push([b"x" * 10] * 10)
    assert len(buf.peek(3, 10**6).payloads) == 3
    assert len(buf.peek(100, 25).payloads) == 2
    assert len(buf.peek(100, 1).payloads) == 1


def test_peek_from_a_seq_takes_the_batch_after_one_in_flight() -> None:
    buf = SharedBuffer(max_size=10)
    buf.push([ev(i) for i in range(8)])
    first = buf.peek(3, 10**6)
    assert (first.first_seq, first.full) == (0, True)
    after = buf.peek(3, 10**6, from_seq=3)
    assert (after.first_seq, after.payloads, after.full) == (3, [ev(3), ev(4), ev(5)], True)
    tail = buf.peek(3, 10**6, from_seq=6)
    assert (tail.payloads, tail.full) == ([ev(6), ev(7)], False)  # the buffer's end, not the budget
    assert buf.peek(3, 10**6, from_seq=8).payloads == []
    assert buf.peek(100, 10, from_seq=6).full  # stopped by the byte budget
    buf.push([ev(i) for i in range(8, 14)])  # drops 0-3: seq 3 has left the buffer
    assert buf.peek(3, 10**6, from_seq=3).payloads == []
    assert buf.peek(3, 10**6, from_seq=4).payloads == [ev(4), ev(5), ev(6)]


def test_commit_removes_delivered_and_rejected_and_keeps_the_rest_in_order() -> None:
    buf = SharedBuffer(max_size=100)
    buf.push([ev(i) for i in range(10)])
    batch = buf.peek(6, 10**6)
    buf.commit(batch, delivered=[0, 1, 2], rejected=[4])
    assert buf.peek(100, 10**6).payloads == [ev(3), ev(5), ev(6), ev(7), ev(8), ev(9)]
    s = buf.snapshot()
    assert (s["delivered"], s["rejected"], s["buffered"]) == (3, 1, 6)
    assert balanced(buf)


def test_whole_batches_delivered_leave_the_rest_in_order_with_its_bytes() -> None:
    buf = SharedBuffer(max_size=100)
    buf.push([ev(i) for i in range(20)])
    for size, budget in ((5, 10**6), (100, 30), (100, 10**6)):  # ring longer, byte budget, all
        batch = buf.peek(size, budget)
        assert batch.nbytes == sum(map(len, batch.payloads))
        buf.commit(batch, delivered=range(len(batch.payloads)), rejected=[])
        left = buf.peek(100, 10**6).payloads
        assert left == [ev(i) for i in range(20 - len(left), 20)]
        assert buf.snapshot()["buffered_bytes"] == sum(map(len, left))
    s = buf.snapshot()
    assert (s["delivered"], s["buffered"], s["buffered_bytes"]) == (20, 0, 0) and balanced(buf)
    assert buf.oldest_age() == 0.0


def test_events_dropped_in_flight_but_delivered_count_as_delivered() -> None:
    buf = SharedBuffer(max_size=4)
    buf.push([ev(i) for i in range(4)])
    batch = buf.peek(4, 10**6)
    buf.push([ev(i) for i in range(4, 7)])  # drops 0..2 while the batch is in flight
    assert buf.snapshot()["dropped_overflow"] == 3
    buf.commit(batch, delivered=range(4), rejected=[])
    s = buf.snapshot()
    assert s["delivered"] == 4 and s["dropped_overflow"] == 0
    assert buf.peek(100, 10**6).payloads == [ev(4), ev(5), ev(6)]
    assert balanced(buf)


def test_a_retried_push_is_taken_once() -> None:
    buf = SharedBuffer(max_size=100)
    buf.push([ev(1)], client_id="c", push_seq=1, recorded=1)
    buf.push([ev(1)], client_id="c", push_seq=1, recorded=1)
    buf.push([ev(2)], client_id="c", push_seq=2, recorded=3, staging_dropped=2)
    s = buf.snapshot()
    assert s["buffered"] == 2 and s["recorded"] == 4 and s["duplicate_pushes"] == 1
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
    buf = SharedBuffer(max_size=max_size)
    counter = 0
    in_flight = None
    for op, a, b in script:
        if op == "push":
            buf.push([ev(counter + i) for i in range(a)], staging_dropped=b)
            counter += a
        elif in_flight is None:
            if len(buf):
                in_flight = buf.peek(a, 10**9)
        else:
            n = len(in_flight.payloads)
            delivered = [i for i in range(n) if (b >> (2 * i)) & 3 == 1]
            rejected = [i for i in range(n) if (b >> (2 * i)) & 3 == 2]
            buf.commit(in_flight, delivered, rejected)
            in_flight = None
        assert balanced(buf)
        assert len(buf) <= max_size
        assert buf.snapshot()["buffered_bytes"] == sum(map(len, buf.peek(10**6, 10**9).payloads))
        # Order is kept: what remains is increasing.
        left = [int(p[5:-1]) for p in buf.peek(10**6, 10**9).payloads]
        assert left == sorted(left)


def test_remembered_clients_are_bounded_oldest_first(monkeypatch: object) -> None:
    import samsara_mp.buffer as buffer_module

    monkeypatch.setattr(buffer_module, "MAX_REMEMBERED_CLIENTS", 3)  # type: ignore[attr-defined]
    buf = SharedBuffer(max_size=100)
    for name in ("a", "b", "c"):
        buf.push([ev(1)], client_id=name, push_seq=1)
    buf.push([ev(2)], client_id="a", push_seq=2)  # "a" is now the most recent
    buf.push([ev(3)], client_id="d", push_seq=1)  # evicts "b", the oldest
    assert buf.snapshot()["clients_seen"] == 3
    buf.push([ev(4)], client_id="a", push_seq=2)  # still remembered: ignored
    assert buf.snapshot()["duplicate_pushes"] == 1
