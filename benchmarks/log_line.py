"""What one JSON log line costs: the orchestrator's "request finished" line, rendered as
``enginedge serve`` renders it (``configure_logging``), written to /dev/null, in CPU
microseconds per line (best of five rounds).

    .venv/bin/python -m benchmarks.log_line            # or --lines 50000

docs/performance.md says what the figure means at ``LOG_LEVEL=info``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from pathlib import Path

from enginedge.adapters.telemetry.logging import configure_logging

FIELDS = {
    "requestId": str(uuid.uuid4()),
    "status": "COMPLETED",
    "taskType": "echo",
    "workerType": "data-processing",
    "workerId": str(uuid.uuid4()),
    "attempts": 1,
    "processingTime": 0,
    "correlationId": None,
    "error": None,
}


def measure(lines: int, rounds: int = 5) -> float:
    """Best CPU microseconds per line over ``rounds`` rounds of ``lines`` lines."""
    with Path("/dev/null").open("w") as sink:
        configure_logging("info", sink)
        log = logging.getLogger("enginedge.application.outbox")
        for _ in range(1000):  # warm-up
            log.info("request finished", extra=FIELDS)
        best = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(lines):
                log.info("request finished", extra=FIELDS)
            best = min(best, (time.process_time() - started) / lines * 1e6)
        logging.getLogger().handlers.clear()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000)
    args = parser.parse_args()
    print(json.dumps({"cpu_us_per_line": round(measure(args.lines), 1)}))


if __name__ == "__main__":
    main()
