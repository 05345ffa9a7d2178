"""Group commit: concurrent submissions share transactions, and one bad request in a shared
transaction fails alone."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enginedge.application.outbox import dispatch_message
from enginedge.application.ports import IdempotencyKeyTaken
from enginedge.domain.model import Request
from tests.support.harness import API_KEY, fast_settings, run_service
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
            return dataclasses.replace(template, id=uuid.uuid4(), idempotency_key=key)

        batch = [copy(None), copy("k1"), copy(None), copy("k2")]
        outcomes = await asyncio.gather(
            *(writer.add(r, [dispatch_message(r)]) for r in batch), return_exceptions=True
        )
        assert outcomes[0] is None and outcomes[2] is None and outcomes[3] is None
        assert isinstance(outcomes[1], IdempotencyKeyTaken)
        for request, outcome in zip(batch, outcomes, strict=True):
            stored = await svc.service.ctx.store.get_request(request.id)
            assert (stored is not None) == (outcome is None)
