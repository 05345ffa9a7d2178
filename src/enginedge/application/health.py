"""The health use case behind /health and /ready (SPEC §8)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from enginedge.application.context import Context
from enginedge.domain.model import WorkerStatus


@dataclass(slots=True)
class ComponentHealth:
    status: str  # "up" or "down"
    error: str | None = None


@dataclass(slots=True)
class HealthReport:
    components: dict[str, ComponentHealth]
    workers: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(c.status == "up" for c in self.components.values())

    @property
    def status(self) -> str:
        if not self.ready:
            return "down"
        if any(w["healthy"] == 0 for w in self.workers.values()):
            return "degraded"
        return "ok"


async def _probe(check: Callable[[], Awaitable[None]], timeout: float) -> ComponentHealth:
    try:
        async with asyncio.timeout(timeout):
            await check()
    except TimeoutError:
        return ComponentHealth("down", f"no answer within {timeout:g}s")
    except Exception as exc:  # any failure of a backing service means "down"
        return ComponentHealth("down", f"{type(exc).__name__}: {exc}"[:300])
    return ComponentHealth("up")


async def check_components(ctx: Context) -> dict[str, ComponentHealth]:
    """Probe the store, the bus and the cache side by side, each within the probe timeout."""
    timeout = ctx.policy.probe_timeout
    store, bus, cache = await asyncio.gather(
        _probe(ctx.store.ping, timeout),
        _probe(ctx.bus.ping, timeout),
        _probe(ctx.cache.ping, timeout),
    )
    return {"database": store, "messageBus": bus, "cache": cache}


async def fleet_counts(ctx: Context) -> dict[str, dict[str, int]]:
    """Per worker type, how many workers are healthy out of how many (empty if the registry
    cannot be read within the probe timeout: the fleet is then unknown)."""
    now = ctx.clock.now()
    try:
        async with asyncio.timeout(ctx.policy.probe_timeout):
            workers = await ctx.registry.all()
    except Exception:
        workers = []
    counts: dict[str, dict[str, int]] = {}
    for worker in workers:
        of_type = counts.setdefault(worker.type, {"healthy": 0, "total": 0})
        of_type["total"] += 1
        if worker.effective_status(now, ctx.policy.heartbeat_ttl) is WorkerStatus.HEALTHY:
            of_type["healthy"] += 1
    return counts


async def health(ctx: Context) -> HealthReport:
    """Components plus, per worker type, how many workers are healthy out of how many."""
    return HealthReport(components=await check_components(ctx), workers=await fleet_counts(ctx))
