"""gzip of the publisher's batches: ISA-L at level 1 when the "fast" extra is installed, zlib otherwise."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from samsara_mp.transport import Transport, gzip_bytes, gzip_level1, join_events

ROOT = Path(__file__).resolve().parent.parent
BATCH = [b'{"eventName":"bench.event","seq":%d,"payload":"%s","sourceId":"s-%d"}' % (i, b"x" * 50, i % 7)
         for i in range(5_000)]


def _zlib(data: bytes, level: int) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


def test_level_1_is_isal_where_the_test_extra_installed_it() -> None:
    import isal  # noqa: F401 - the test extra installs it, as the fast extra does

    body = b"[" + b",".join(BATCH) + b"]"
    packed = gzip_bytes(body, 1)
    assert gzip_level1() == "isal"
    assert packed != _zlib(body, 1)  # ISA-L's own stream, not zlib's
    assert gzip.decompress(packed) == body
    assert len(packed) < len(body) / 10


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100_000), st.sampled_from([1, 2, 6, 9]))
def test_every_level_gives_one_gzip_member_of_the_same_bytes(data: bytes, level: int) -> None:
    packed = gzip_bytes(data, level)
    assert packed[:2] == b"\x1f\x8b"
    assert gzip.decompress(packed) == data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**40).map(lambda i: b'{"i":%d}' % i), max_size=50))
def test_a_batch_joins_into_the_json_array_of_its_events_and_is_left_as_it_was(events: list[bytes]) -> None:
    before = list(events)
    body = join_events(events)
    assert body == b"[" + b",".join(events) + b"]"
    assert json.loads(body) == [json.loads(e) for e in events]
    assert events == before


def test_other_levels_are_zlib_as_configured() -> None:
    body = b"[" + b",".join(BATCH[:500]) + b"]"
    for level in range(2, 10):
        assert gzip_bytes(body, level) == _zlib(body, level)


def test_a_transport_sends_what_it_compressed() -> None:
    transport = Transport("http://127.0.0.1:9/v1/events", 1.0)
    try:
        body = transport.encode(BATCH[:100])
    finally:
        transport.session.close()
    assert gzip.decompress(body.data) == b"[" + b",".join(BATCH[:100]) + b"]"


def test_without_isal_level_1_is_zlibs() -> None:
    probe = (
        "import sys, zlib, gzip; sys.modules['isal'] = None\n"
        "from samsara_mp.transport import gzip_bytes, gzip_level1\n"
        "body = b'[' + b','.join([b'{\"a\":1}'] * 1000) + b']'\n"
        "c = zlib.compressobj(1, zlib.DEFLATED, 31)\n"
        "print(gzip_level1(), gzip_bytes(body, 1) == c.compress(body) + c.flush())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    assert out.stdout.split() == ["zlib", "True"], out.stderr
