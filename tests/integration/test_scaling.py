"""Scaling the data tier as the deployment guide's "Scaling" section says (docs/scaling.md).

PgBouncer in transaction pooling mode is covered by the whole API suite, which runs through
one too (the ``pgbouncer`` parameter of ``database_url`` in ``tests/conftest.py``). Here: a
streaming read replica for status and list reads; and, over Kafka, orchestrator replicas
sharing one consumer group while each worker reads an inbox of several partitions of its own,
in no group.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from enginedge.application.console import DEAD_LETTERS_GROUP
from enginedge.domain.messages import ORCHESTRATOR_GROUP, inbox_topic
from tests.integration.test_distributed import (
    Cluster,
    H,
    cluster,
    db_counts,
    http,
    sql_payload,
)
from tests.support.harness import API_KEY, fast_settings, run_service, until
from tests.support.servers import (
    PostgresServer,
    postgres_bin_dir,
    postgres_server,
    streaming_replica,
)
from tests.support.workers import Probe, worker_for_tests

__all__ = ["cluster", "http"]  # fixtures, reused from the distributed tests


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A PostgreSQL primary of its own and a hot standby streaming from it."""
    if not (postgres_bin_dir() / "pg_basebackup").exists():
        pytest.skip("no pg_basebackup next to the PostgreSQL server binaries to make a replica")
    with postgres_server() as primary, streaming_replica(primary) as replica:
        yield primary, replica


async def connect(url: str, timeout: float = 30.0) -> asyncpg.Connection:
    """Connect, waiting while a standby is still starting up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncpg.connect(url)
        except (asyncpg.CannotConnectNowError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def status_in(conn: asyncpg.Connection, request_id: str) -> str | None:
    """The request's status on that server; None if it has no such request (or, a replica
    that has not replayed the migrations yet, no table)."""
    try:
        value = await conn.fetchval(
            "SELECT status FROM requests WHERE id = $1", uuid.UUID(request_id)
        )
    except asyncpg.UndefinedTableError:
        return None
    return None if value is None else str(value)


async def test_status_and_list_read_the_replica_and_a_new_request_is_still_found(
    primary_and_replica: tuple[PostgresServer, PostgresServer], tmp_path: Path
) -> None:
    primary, replica = primary_and_replica
    probe = Probe()
    settings = fast_settings(tmp_path, primary.url, database_read_url=replica.url)
    on_primary = await connect(primary.url)
    on_replica = await connect(replica.url)
    try:
        async with run_service(settings, [worker_for_tests(probe)]) as svc:
            # A request that runs until released, and one that takes a few seconds; wait
            # until the replica has both, the first one running.
            running = (await svc.submit("test.hang", {})).json()["requestId"]
            slow = (await svc.submit("test.sleep", {"seconds": 3})).json()["requestId"]

            async def replica_sees_it_running() -> bool:
                return await status_in(on_replica, running) == "PROCESSING" and (
                    await status_in(on_replica, slow) is not None
                )

            await until("the replica to see the request running", replica_sees_it_running)

            # The replica stops applying the primary's changes: from now on it lags.
            await on_replica.execute("SELECT pg_wal_replay_pause()")

            async def paused() -> bool:
                state = await on_replica.fetchval("SELECT pg_get_wal_replay_pause_state()")
                return bool(state == "paused")

            await until("replay to pause", paused)

            # A change made on the primary alone: status and list reads do not see it yet.
            await on_primary.execute(
                "UPDATE requests SET correlation_id = 'only-on-the-primary' WHERE id = $1",
                uuid.UUID(running),
            )
            seen = await svc.get(running)
            assert (seen["status"], seen["correlationId"]) == ("PROCESSING", None), seen

            # The request finishes on the primary.
            probe.release.set()

            async def primary_has_it_done() -> bool:
                return await status_in(on_primary, running) == "COMPLETED"

            await until("the request to complete on the primary", primary_has_it_done)

            # A request created now is not on the replica, yet readable right after its 202.
            accepted = await svc.submit("test.echo", {"n": 1})
            assert accepted.status_code == 202, accepted.text
            fresh = accepted.json()["requestId"]
            assert (await svc.get(fresh))["requestId"] == fresh
            assert await status_in(on_replica, fresh) is None
            final = await svc.wait_terminal(fresh)  # read from the primary after each miss
            assert final["status"] == "COMPLETED", final

            # Lists come from the replica: the new request is not there yet.
            page = await svc.client.get("/api/requests", headers={"X-API-Key": API_KEY})
            listed = {item["requestId"]: item for item in page.json()["items"]}
            assert set(listed) == {running, slow}, listed
            assert listed[running]["correlationId"] is None

            # Long polling returns the outcome once told of it, though the replica lags.
            waited = await svc.client.get(
                f"/api/requests/{slow}?wait=20", headers={"X-API-Key": API_KEY}
            )
            assert waited.json()["status"] == "COMPLETED", waited.text
            assert await status_in(on_replica, slow) != "COMPLETED"

            # Writes never went to the replica (it would have refused them), and once it
            # replays again both reads catch up.
            await on_replica.execute("SELECT pg_wal_replay_resume()")
            done = await svc.wait_terminal(running)
            assert done["status"] == "COMPLETED", done

            async def listed_both() -> bool:
                page = await svc.client.get("/api/requests", headers={"X-API-Key": API_KEY})
                listed = {item["requestId"] for item in page.json()["items"]}
                return listed == {running, slow, fresh}

            await until("the list to show both requests", listed_both)
            page = await svc.client.get("/api/requests", headers={"X-API-Key": API_KEY})
            marked = {item["requestId"]: item["correlationId"] for item in page.json()["items"]}
            assert marked[running] == "only-on-the-primary"
    finally:
        await on_primary.close()
        await on_replica.close()


async def group_members(brokers: str, group: str) -> tuple[str, int]:
    """A consumer group's state and member count, as ``kafka-consumer-groups --describe
    --members`` would show them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    try:
        response = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    _error, _group, state, _protocol_type, _protocol, members = response[0].groups[0]
    return str(state), len(members)


async def partition_count(brokers: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return len(described["partitions"])


async def consumer_groups(brokers: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    try:
        return {group for group, _protocol in await admin.list_consumer_groups()}
    finally:
        await admin.close()


async def worker_inboxes(database_url: str) -> dict[str, str | None]:
    """Each worker's inbox topic, as its heartbeats announced it (the ``workers`` table)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, inbox FROM workers WHERE type = 'data-processing'")
    finally:
        await conn.close()
    return {str(row["id"]): row["inbox"] for row in rows}


REQUESTS = 90


async def test_three_workers_each_read_an_inbox_of_six_partitions(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    cluster.extra_env["KAFKA_PARTITIONS"] = "6"
    # Two orchestrator replicas share group main-hexagon; each of three workers reads the 6
    # partitions of its own inbox topic, in no consumer group: the scheduler picks the
    # worker, the topic only carries the choice.
    a = cluster.start_replica()
    b = cluster.start_replica()
    for _ in range(3):
        cluster.start_worker(capacity=2)
    cluster.wait_for_workers(a, 3)
    inboxes = await worker_inboxes(cluster.database_url)
    assert len(inboxes) == 3, inboxes
    for worker_id, inbox in inboxes.items():
        assert inbox is not None, inboxes
        prefix = inbox_topic("data-processing", worker_id, "").removesuffix(".requests")
        assert inbox.startswith(prefix) and inbox.endswith(".requests"), inbox
        assert await partition_count(cluster.brokers, inbox) == 6
    assert len(set(inboxes.values())) == 3  # one topic each

    async def settled() -> bool:
        replicas = await group_members(cluster.brokers, ORCHESTRATOR_GROUP)
        return replicas == ("Stable", 2)

    # The test broker takes seconds per rebalance: submit once the replicas' group is stable.
    await until("the replicas' consumer group to settle", settled, timeout=90)
    await asyncio.sleep(2)
    # No worker is in a consumer group: only the replicas' groups exist.
    assert await consumer_groups(cluster.brokers) <= {ORCHESTRATOR_GROUP, DEAD_LETTERS_GROUP}

    ids: list[str] = []
    for i in range(REQUESTS):
        url = a if i % 2 == 0 else b
        response = await http.post(
            f"{url}/api/orchestrate",
            headers=H,
            json={"taskType": "data.sql", "payload": sql_payload(i)},
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["requestId"])

    async def all_completed() -> bool:
        counts = await db_counts(cluster.database_url)
        assert not set(counts) & {"FAILED", "TIMEOUT", "CANCELLED"}, counts
        return counts == {"COMPLETED": REQUESTS}

    try:
        await until("every request to complete", all_completed, timeout=120)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.log_tails()}") from None

    conn = await asyncpg.connect(cluster.database_url)
    try:
        rows = await conn.fetch(
            "SELECT r.id, r.worker_id, count(rr.id) AS results, min(rr.worker_id) AS by "
            "FROM requests r LEFT JOIN request_results rr ON rr.request_id = r.id "
            "GROUP BY r.id, r.worker_id"
        )
    finally:
        await conn.close()
    assert {str(row["id"]) for row in rows} == set(ids)
    for row in rows:
        # Handled to completion once: one recorded outcome, by the worker that held it.
        assert row["results"] == 1, row
        assert str(row["by"]) == str(row["worker_id"]), row
    per_worker: dict[str, int] = {}
    for row in rows:
        worker = str(row["worker_id"])
        per_worker[worker] = per_worker.get(worker, 0) + 1
    healthy = httpx.get(f"{a}/api/workers", headers=H).json()["items"]
    assert set(per_worker) == {w["workerId"] for w in healthy}, (per_worker, healthy)
    assert set(per_worker) == set(inboxes), (per_worker, inboxes)
    assert len(per_worker) == 3 and all(n > 0 for n in per_worker.values()), per_worker
    # Still no worker joined a group, and the replicas' group kept its two members.
    assert await consumer_groups(cluster.brokers) <= {ORCHESTRATOR_GROUP, DEAD_LETTERS_GROUP}
    assert await group_members(cluster.brokers, ORCHESTRATOR_GROUP) == ("Stable", 2)
    assert cluster.stop_all() == [0] * 5
