"""Group commit: concurrent submissions share transactions, and one bad request in a shared
transaction fails alone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from enginedge.application.ports import IdempotencyKeyTaken
from enginedge.domain.model import Request, RequestStatus
from tests.support.harness import API_KEY, fast_settings, run_service, until
from tests.support.store_spy import SpiedStore
from tests.support.workers import Probe, worker_for_tests

H = {"X-API-Key": API_KEY}


async def test_concurrent_submissions_share_commits(database_url: str, tmp_path: Path) -> None:
    settings = fast_settings(tmp_path, database_url)
    async with run_service(settings, [worker_for_tests(Probe())]) as svc:
        inserts: list[int] = []

        async def add_requests(real: Any, requests: Sequence[Request]) -> None:
            inserts.append(len(requests))
            await real(requests)

        ctx = svc.service.ctx
        ctx.store = SpiedStore(ctx.store, add_requests=add_requests)  # type: ignore[assignment]
        responses = await asyncio.gather(*(svc.submit("test.echo", {"i": i}) for i in range(60)))
        assert [r.status_code for r in responses] == [202] * 60
        assert sum(inserts) == 60
        assert max(inserts) > 1  # several requests went in one commit
        assert len(inserts) < 60
        for response in responses:
            final = await svc.wait_terminal(response.json()["requestId"])
            assert final["status"] == "COMPLETED"


async def test_a_clash_in_a_shared_commit_fails_only_its_request(
    database_url: str, tmp_path: Path
) -> None:
    settings = fast_settings(tmp_path, database_url)
    async with run_service(settings, [worker_for_tests(Probe())]) as svc:
        first = (await svc.submit("test.echo", {}, headers={"Idempotency-Key": "k1"})).json()
        template = await svc.service.ctx.store.get_request(uuid.UUID(first["requestId"]))
        assert template is not None
        writer = svc.service.ctx.writer

        def copy(key: str | None) -> Request:
            return dataclasses.replace(
                template, id=uuid.uuid4(), idempotency_key=key, status=RequestStatus.PENDING
            )

        batch = [copy(None), copy("k1"), copy(None), copy("k2")]
        outcomes = await asyncio.gather(*(writer.add(r) for r in batch), return_exceptions=True)
        assert outcomes[0] is None and outcomes[2] is None and outcomes[3] is None
        assert isinstance(outcomes[1], IdempotencyKeyTaken)
        for request, outcome in zip(batch, outcomes, strict=True):
            stored = await svc.service.ctx.store.get_request(request.id)
            assert (stored is not None) == (outcome is None)
            # Each accepted request was told PENDING once, though its batch was written twice
            # (together, then one by one); the refused one was told nothing.
            history = await svc.service.ctx.events.history(request.id, None)
            told = [e for e in history if e.type == "status" and e.data["status"] == "PENDING"]
            assert len(told) == (1 if outcome is None else 0)


async def test_a_batch_whose_commit_fails_is_told_once_per_request(
    database_url: str, tmp_path: Path
) -> None:
    # A batch's PENDING events go out just before its commit. When that commit fails, the
    # requests are written again one by one: they must not be told PENDING a second time.
    settings = fast_settings(tmp_path, database_url)
    lost: list[int] = []

    class LosesTheFirstCommitOfSeveral(SpiedStore):
        """The real store, except that the first transaction adding several requests fails
        as it commits: after its body ran, so after their events were told."""

        @contextlib.asynccontextmanager
        async def transaction(self, *, durable: bool = True) -> AsyncIterator[Any]:
            added: list[int] = []

            async def add_requests(real: Any, requests: Sequence[Request]) -> None:
                added.append(len(requests))
                await real(requests)

            spied = SpiedStore(self.inner, add_requests=add_requests)
            async with spied.transaction(durable=durable) as tx:
                yield tx
                if not lost and sum(added) > 1:
                    lost.append(sum(added))
                    raise ConnectionError("the commit was lost")  # the batch rolls back

    async with run_service(settings, [worker_for_tests(Probe())]) as svc:
        ctx = svc.service.ctx
        ctx.store = LosesTheFirstCommitOfSeveral(ctx.store)  # type: ignore[assignment]
        responses = await asyncio.gather(*(svc.submit("test.echo", {"i": i}) for i in range(20)))
        assert [r.status_code for r in responses] == [202] * 20
        assert lost and lost[0] > 1  # a batch of several was lost at its commit
        for response in responses:
            rid = response.json()["requestId"]
            assert (await svc.wait_terminal(rid))["status"] == "COMPLETED"
            history = await ctx.events.history(uuid.UUID(rid), None)
            statuses = [e.data["status"] for e in history if e.type == "status"]
            assert statuses.count("PENDING") == 1, statuses


async def test_only_the_schedulers_and_the_relays_commits_skip_the_wal_flush(
    pg_url: str, tmp_path: Path
) -> None:
    # SPEC §4: a request is answered after a durable commit, and an outcome is recorded in
    # one. Only the scheduler's pass (lost, the request is still PENDING and is dispatched
    # again) and the relay's bookkeeping (lost, it sends its messages again) may commit
    # without waiting for the WAL flush, and asking for it costs no round trip of its own
    # on the way of a dispatch or a cancel: the relay asks after its statements, the
    # scheduler in the statement that takes its lock.
    from sqlalchemy import event

    settings = fast_settings(tmp_path, pg_url)
    async with run_service(settings, [worker_for_tests(Probe())]) as svc:
        engine = svc.service.ctx.store.engine.sync_engine  # type: ignore[attr-defined]
        open_: dict[int, list[str]] = {}
        committed: list[list[str]] = []

        def begin(conn: Any) -> None:
            open_[id(conn)] = []

        def execute(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            open_.setdefault(id(conn), []).append(statement)

        def commit(conn: Any) -> None:
            committed.append(open_.pop(id(conn), []))

        event.listen(engine, "begin", begin)
        event.listen(engine, "before_cursor_execute", execute)
        event.listen(engine, "commit", commit)
        try:
            rid = (await svc.submit("test.echo", {"x": 1})).json()["requestId"]
            final = await svc.wait_terminal(rid)
            # A cancel is the one message left in the outbox: the relay sends it.
            hung = (await svc.submit("test.hang", {})).json()["requestId"]
            await svc.wait_for(hung, lambda b: b["status"] == "PROCESSING")
            cancelled = await svc.client.post(f"/api/requests/{hung}/cancel", headers=H)
            assert cancelled.status_code == 200, cancelled.text

            async def relayed() -> bool:
                return await svc.service.ctx.store.outbox_backlog() == 0

            await until("the relay to send the cancel", relayed)
        finally:
            event.remove(engine, "begin", begin)
            event.remove(engine, "before_cursor_execute", execute)
            event.remove(engine, "commit", commit)
    assert final["status"] == "COMPLETED"

    def kind(statements: list[str]) -> str:
        text = " ".join(statements)
        for marker, name in (
            ("INSERT INTO requests ", "accept"),
            ("pg_advisory_xact_lock", "schedule"),
            ("DELETE FROM outbox", "relay"),
            ("INSERT INTO request_results", "outcome"),
        ):
            if marker in text:
                return name
        return "other"

    by_kind: dict[str, list[list[str]]] = {}
    for statements in committed:
        by_kind.setdefault(kind(statements), []).append(statements)
    assert {"accept", "schedule", "relay", "outcome"} <= set(by_kind), list(by_kind)
    for durable in by_kind["accept"] + by_kind["outcome"]:
        assert not any("synchronous_commit" in s for s in durable), durable
    for statements in by_kind["relay"]:
        relaxed = [i for i, s in enumerate(statements) if "synchronous_commit" in s]
        assert relaxed == [len(statements) - 1], statements
    for statements in by_kind["schedule"]:
        # Said with the lock, its first statement: no round trip of its own.
        relaxed = [i for i, s in enumerate(statements) if "synchronous_commit" in s]
        assert relaxed == [0], statements
        assert "pg_advisory_xact_lock" in statements[0]
