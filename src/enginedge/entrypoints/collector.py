"""The garbage collector's settings for a long-running service process.

With CPython's defaults the youngest generation is collected after 700 net allocations of
container objects, which a service makes in a few requests, and the whole heap (the modules,
FastAPI's routes, pydantic's and SQLAlchemy's structures: several hundred thousand objects)
every hundred or so of those. Measured under load (embedded, 64 in flight, 10,000 round trips;
docs/performance.md): 16% of the orchestrator's CPU went to the collector, each full collection
stopped the event loop for about 90 ms, and p99 latency was 220-240 ms.
"""

from __future__ import annotations

import gc

# Net allocations of container objects between collections of the youngest generation. Ten
# thousand such objects pending are a few megabytes at most.
YOUNG_GENERATION_THRESHOLD = 10_000


def settle_for_service() -> None:
    """Call once start-up has built what the process keeps for its whole life: collect what
    start-up left over, set aside what remains so that no later collection scans it again,
    and collect the youngest generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)
