"""Active worker health checks over HTTP (SPEC §5)."""

from __future__ import annotations

import httpx


class HttpWorkerProber:
    """GET ``<endpoint>/health``; any 2xx is healthy."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(follow_redirects=False)

    async def probe(self, endpoint: str, timeout: float) -> str | None:
        try:
            response = await self._client.get(endpoint.rstrip("/") + "/health", timeout=timeout)
        except httpx.TimeoutException:
            return f"health check timed out after {timeout:g}s"
        except httpx.HTTPError as exc:
            return f"health check failed: {type(exc).__name__}: {exc}"[:300]
        if response.is_success:
            return None
        reason = ""
        try:
            body = response.json()
            reason = (
                f": {body.get('reason')}" if isinstance(body, dict) and body.get("reason") else ""
            )
        except ValueError:
            pass
        return f"health check answered {response.status_code}{reason}"[:300]

    async def close(self) -> None:
        await self._client.aclose()
