"""Processes that die or freeze with requests in flight: a worker killed with SIGKILL, a
worker frozen with SIGSTOP and resumed late, the orchestrator killed right after its 202s.
Every accepted request ends COMPLETED, recorded exactly once (checked in PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time

import httpx

from tests.faults.support import (
    FaultCluster,
    H,
    Load,
    Prober,
    check,
    freeze,
    ignored_results,
    in_flight,
    kill,
    record,
    thaw,
    verdict,
    verdict_figures,
    wait_all_terminal,
    wait_processing,
    worker_endpoint,
)
from tests.support.harness import wait_worker


async def _terminal(url: str, http: httpx.AsyncClient, rids: list[str], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        bodies = [(await http.get(f"{url}/api/requests/{r}", headers=H)).json() for r in rids]
        if all(b["status"] in {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"} for b in bodies):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"requests of the lost worker not terminal after {timeout}s")


async def test_worker_killed_mid_request(
    fault_cluster: FaultCluster, http: httpx.AsyncClient
) -> None:
    c = fault_cluster
    url = c.start_replica()
    c.start_fault_worker(capacity=3)
    c.start_fault_worker(capacity=3)
    c.wait_for_workers(url, 2)
    load = Load(url, http)
    await load.submit_many(fast=100, slow=6)
    slow = [rid for rid, (kind, _) in load.accepted.items() if kind == "slow"]
    processing = await wait_processing(url, http, slow)
    victim_id = next(iter(processing.values()))
    victim = c.worker_endpoints[await worker_endpoint(url, http, victim_id)]
    held = [rid for rid, w in processing.items() if w == victim_id]
    caught = await in_flight(c.database_url, load)

    prober = Prober(url, known=held[0], allowed=frozenset({200, 202}))
    prober.start(load)
    kill(victim)
    killed_at = time.monotonic()
    recovery = await _terminal(url, http, held, timeout=90)
    await prober.stop()
    await wait_all_terminal(c.database_url, load, timeout=150)
    drained = time.monotonic() - killed_at
    v = await verdict(c.database_url, load)
    record(
        "worker-sigkill",
        fault="worker process killed with SIGKILL while running requests",
        inFlight=caught,
        heldByVictim=len(held),
        accepted=len(load.accepted),
        outcome=v.statuses,
        recoverySeconds=round(recovery, 2),
        recoveryMeaning="kill -> the victim's requests terminal (re-run elsewhere)",
        allTerminalSeconds=round(drained, 2),
        apiDuringFault=prober.summary(),
        **verdict_figures(v),
    )
    assert not prober.problems, prober.problems[:5]
    check(v, load)
    for rid in held:
        assert v.rows[rid]["attempts"] >= 2, v.rows[rid]  # dispatched again


async def test_worker_frozen_then_resumed_late(
    fault_cluster: FaultCluster, http: httpx.AsyncClient
) -> None:
    c = fault_cluster
    url = c.start_replica()
    c.start_fault_worker(capacity=3)
    c.start_fault_worker(capacity=3)
    c.wait_for_workers(url, 2)
    load = Load(url, http)
    await load.submit_many(fast=60, slow=6)
    slow = [rid for rid, (kind, _) in load.accepted.items() if kind == "slow"]
    processing = await wait_processing(url, http, slow)
    victim_id = next(iter(processing.values()))
    victim = c.worker_endpoints[await worker_endpoint(url, http, victim_id)]
    other = next(p for p in c.workers if p is not victim)
    held = [rid for rid, w in processing.items() if w == victim_id]
    caught = await in_flight(c.database_url, load)
    ignored_before = await ignored_results([url], http)

    freeze(victim)
    frozen_at = time.monotonic()
    try:
        recovery = await _terminal(url, http, held, timeout=90)
        # Resumed well past the heartbeat TTL (4 s): its attempt has been superseded.
        await asyncio.sleep(max(0.0, 8 - (time.monotonic() - frozen_at)))
    finally:
        thaw(victim)
    frozen_for = time.monotonic() - frozen_at
    await wait_all_terminal(c.database_url, load, timeout=150)
    drained = time.monotonic() - frozen_at
    v = await verdict(c.database_url, load)

    # The resumed worker reports its stale attempts, which change nothing ...
    for _ in range(60):
        ignored = await ignored_results([url], http) - ignored_before
        if ignored >= 1:
            break
        await asyncio.sleep(0.5)
    # ... and keeps consuming: with the other worker gone, it runs all new work.
    kill(other)
    await wait_worker(url, http, victim_id, headers=H)
    after = Load(url, http)
    await after.submit_many(fast=20, start=5000)
    await wait_all_terminal(c.database_url, after, timeout=120)
    v_after = await verdict(c.database_url, after)
    workers_after = {
        (await http.get(f"{url}/api/requests/{rid}", headers=H)).json()["workerId"]
        for rid in after.accepted
    }

    v_late = await verdict(c.database_url, load)  # the late results changed nothing
    record(
        "worker-sigstop",
        fault="worker frozen with SIGSTOP while running requests, SIGCONT after the TTL",
        inFlight=caught,
        heldByVictim=len(held),
        frozenSeconds=round(frozen_for, 1),
        accepted=len(load.accepted),
        outcome=v.statuses,
        recoverySeconds=round(recovery, 2),
        recoveryMeaning="SIGSTOP -> the frozen worker's requests terminal (re-run elsewhere)",
        allTerminalSeconds=round(drained, 2),
        lateResultsIgnored=ignored,
        resumedWorkerRanAfterwards=len(after.accepted) if workers_after == {victim_id} else 0,
        **verdict_figures(v),
    )
    check(v, load)
    assert (v_late.statuses, v_late.duplicated, v_late.wrong) == (v.statuses, 0, 0)
    assert v_after.lost == v_after.duplicated == v_after.wrong == 0
    assert v_after.statuses == {"COMPLETED": len(after.accepted)}
    for rid in held:
        assert v.rows[rid]["attempts"] >= 2, v.rows[rid]
    assert workers_after == {victim_id}  # the resumed worker consumes again


async def test_orchestrator_killed_right_after_202(
    fault_cluster: FaultCluster, http: httpx.AsyncClient
) -> None:
    c = fault_cluster
    url = c.start_replica()
    c.start_fault_worker(capacity=3)
    c.start_fault_worker(capacity=3)
    c.wait_for_workers(url, 2)
    load = Load(url, http)
    await load.submit_many(fast=80, slow=4)
    kill(c.replicas[0][0])  # within milliseconds of the last 202
    killed_at = time.monotonic()
    caught = await in_flight(c.database_url, load)

    url = await asyncio.to_thread(c.restart_replica, 0)
    restarted = time.monotonic() - killed_at
    drained = await wait_all_terminal(c.database_url, load, timeout=150)
    v = await verdict(c.database_url, load)
    record(
        "orchestrator-sigkill",
        fault="the only orchestrator replica killed with SIGKILL right after its last 202, "
        "then started again with the same settings",
        inFlight=caught,
        accepted=len(load.accepted),
        outcome=v.statuses,
        recoverySeconds=round(restarted, 2),
        recoveryMeaning="kill -> restarted replica ready",
        allTerminalSeconds=round(time.monotonic() - killed_at, 2),
        afterRestartSeconds=round(drained, 2),
        **verdict_figures(v),
    )
    check(v, load)
    for rid in list(load.accepted)[:5]:
        assert (await http.get(f"{url}/api/requests/{rid}", headers=H)).json()[
            "status"
        ] == "COMPLETED"


async def test_worker_resumed_after_sigstop_stops_on_sigterm(
    fault_cluster: FaultCluster, http: httpx.AsyncClient
) -> None:
    # A resumed process has every timer due at once. By hand, against a broker with a long
    # history, such a worker never exited after SIGTERM: asyncio.wait_for (Python 3.11)
    # dropped the cancellation of a consumer loop (tests/unit/test_cancellation.py shows
    # the mechanism). On this fresh broker the old code happened to stop too; the test
    # keeps the promise that a resumed worker stops.
    c = fault_cluster
    process, endpoint = c.start_fault_worker()
    for _ in range(300):
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get(f"{endpoint}/health")).status_code == 200:
                break
        await asyncio.sleep(0.1)
    await asyncio.sleep(5)  # its readers (inbox, control) are polling
    freeze(process)
    await asyncio.sleep(3)
    thaw(process)
    process.terminate()
    try:
        code = await asyncio.to_thread(process.wait, 30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the worker did not stop within 30 s of SIGTERM") from None
    assert code == 0, c.log_tails()
