"""A multiprocessing.Pool whose workers record analytics events through samsara_mp.

The Pool's parent owns the channel's publisher (``PoolPublisher``); each
worker gets its client from the Pool's initializer, and ships what it staged
even when ``with Pool(...)`` ends it with ``terminate()``.

    SAMSARA_MP_URL=http://127.0.0.1:9000 python pool_example.py 1000
"""

from __future__ import annotations

import multiprocessing
import sys

from samsara_mp import get_client
from samsara_mp.integrations.multiprocessing import PoolPublisher


def score(item: int) -> int:
    """Some work, and an event that records it."""
    result = item * item % 97
    get_client().record_event(eventName="item.scored", item=item, score=result)
    return result


def main(count: int) -> None:
    ctx = multiprocessing.get_context("spawn")  # any start method works
    # url and the rest come from SAMSARA_MP_* variables here.
    with PoolPublisher(sourceId="pool-example") as pub:
        with ctx.Pool(4, **pub.pool_kwargs()) as pool:
            total = sum(pool.map(score, range(count)))
        # Leaving PoolPublisher ships the parent's events and drains the publisher.
    print(f"scored {count} items, total {total}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
