"""The garbage collector's settings for service processes (entrypoints/collector.py).

Run in a child interpreter: freezing and thresholds are per process, and the test runner's
own collector must keep its defaults.
"""

from __future__ import annotations

import subprocess
import sys

import orjson

PROBE = """
import gc, orjson
import enginedge.entrypoints.asgi  # what `enginedge serve` imports before it settles
from enginedge.entrypoints.collector import YOUNG_GENERATION_THRESHOLD, settle_for_service
before = {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}
settle_for_service()
after = {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}
# A cycle made after start-up is still collected.
class Node:
    pass
node = Node()
node.me = node
del node
found = gc.collect()
print(orjson.dumps({"before": before, "after": after, "young": YOUNG_GENERATION_THRESHOLD,
                    "collected": found}).decode())
"""


def test_a_settled_process_sets_start_up_aside_and_collects_the_young_less_often() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    seen = orjson.loads(run.stdout)
    assert seen["before"]["frozen"] == 0
    # What start-up imported is set aside: FastAPI, pydantic, SQLAlchemy and the service's
    # modules, more than a hundred thousand objects.
    assert seen["after"]["frozen"] > 100_000
    young, middle, old = seen["after"]["threshold"]
    assert young == seen["young"] > seen["before"]["threshold"][0]
    assert [middle, old] == seen["before"]["threshold"][1:]
    assert seen["collected"] >= 1
