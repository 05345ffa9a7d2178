"""The operator console end to end, in a real browser: Debian's Chromium, headless, driven by
Playwright (``executable_path``: Playwright's own browser download is not used).

Screenshots of every view are saved to ``artifacts/console-screenshots/`` (see README,
"Console").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from enginedge.application.ports import BusMessage
from enginedge.domain.messages import RESULTS_TOPIC
from enginedge.entrypoints.processes import stop_process
from tests.support.fake_llm import FakeLlm, fake_llm_server
from tests.support.harness import API_KEY, OTHER_KEY, Running, fast_settings, run_service
from tests.support.servers import free_port

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright not installed")
Browser = playwright_api.Browser
Page = playwright_api.Page
expect = playwright_api.expect

CHROMIUM = Path(os.environ.get("TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).parents[2] / "artifacts" / "console-screenshots"
WAIT_MS = 15_000
# An operator's key: the console shows it every tenant's requests, and the dead letters.
OPERATOR_KEY = "operator-key-0123456789"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium when run as "
    "root (apt-get install chromium); otherwise install it, or set TEST_CHROMIUM",
)


@pytest.fixture(scope="module")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with playwright_api.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@contextlib.asynccontextmanager
async def new_page(browser: Browser, width: int = 1280, height: int = 860) -> AsyncIterator[Page]:
    """A page in its own context, closed (with its live streams) before the service stops:
    the test server, unlike `enginedge serve`, waits for open streams without a limit."""
    context = await browser.new_context(viewport={"width": width, "height": height})
    try:
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors  # type: ignore[attr-defined]
        yield page
    finally:
        await context.close()


async def sign_in(
    page: Page, url: str, screenshots: Path | None = None, key: str = API_KEY
) -> None:
    await page.goto(f"{url}/console")
    if screenshots is not None:
        await page.get_by_label("API key").fill("not-the-right-key")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert")).to_contain_text("not valid")
        await page.screenshot(path=screenshots / "01-sign-in.png")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)


def row(page: Page, request_id: str) -> Any:
    return page.locator(f'#requests-table tr[data-request-id="{request_id}"]')


async def submit(svc: Running, task_type: str, payload: dict[str, Any]) -> str:
    response = await svc.submit(task_type, payload)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["requestId"]
    return request_id


def sql(i: int) -> dict[str, Any]:
    return {"sql": "SELECT sum(x) AS total FROM t", "tables": {"t": [{"x": i}, {"x": 1000}]}}


@pytest.fixture
async def slow_llm() -> AsyncIterator[FakeLlm]:
    # 60 tokens, 0.25 s apart: running long enough to watch, and to cancel.
    fake = FakeLlm(tokens=[f"word{i} " for i in range(60)], delay=0.25)
    async with fake_llm_server(fake) as running:
        yield running


async def test_console_follows_requests_live_and_cancels_from_the_page(
    tmp_path: Path, browser: Browser, screenshots: Path, slow_llm: FakeLlm
) -> None:
    settings = fast_settings(
        tmp_path,
        builtin_workers="data-processing,llm",
        llm_base_url=slow_llm.url,
        llm_model="tiny-model",
        api_keys=f"search-team:{API_KEY},{OTHER_KEY}",
        admin_api_keys=f"ops:{OPERATOR_KEY}",
    )
    async with run_service(settings) as svc, new_page(browser) as page:
        await sign_in(page, svc.url, screenshots, OPERATOR_KEY)
        # The key stays in the tab's session storage, never in the address.
        assert OPERATOR_KEY not in page.url
        assert await page.evaluate("sessionStorage.getItem('enginedge.apiKey')") == OPERATOR_KEY
        await expect(page.locator("#whoami")).to_have_text("ops (operator)")

        # Requests submitted through the API appear and complete without a reload.
        ids = [await submit(svc, "data.sql", sql(i)) for i in range(3)]
        for rid in ids:
            await expect(row(page, rid).locator("[data-status]")).to_have_attribute(
                "data-status", "COMPLETED", timeout=WAIT_MS
            )
        # An operator sees whose each request is, by the key's name.
        await expect(page.locator("#th-tenant")).to_be_visible()
        await expect(row(page, ids[0]).locator("td.tenant")).to_have_text("search-team")
        await page.screenshot(path=screenshots / "02-requests.png")

        # Filter by status: a status none of them has empties the table.
        await page.get_by_label("Status").select_option("FAILED")
        await expect(row(page, ids[0])).to_have_count(0, timeout=WAIT_MS)
        await page.get_by_label("Status").select_option("")
        await expect(row(page, ids[0])).to_have_count(1, timeout=WAIT_MS)

        # Open one: its result, payload and timings.
        await page.get_by_role("link", name=f"Open request {ids[1]}").click()
        await expect(page.locator("#h-detail")).to_have_text(f"Request {ids[1]}")
        await expect(page.locator("#d-result")).to_contain_text("1001")
        await expect(page.locator("#d-payload")).to_contain_text("SELECT sum(x)")
        await expect(page.locator("#d-status")).to_have_text("COMPLETED")
        await expect(page.get_by_role("button", name="Cancel this request")).to_be_hidden()
        await page.screenshot(path=screenshots / "03-request-detail.png", full_page=True)

        # A running LLM request: its partial output streams in, then the page cancels it.
        llm = await submit(svc, "llm.chat", {"messages": [{"role": "user", "content": "Hi"}]})
        await page.goto(f"{svc.url}/console#/requests")
        await row(page, llm).get_by_role("link").click()
        await expect(page.locator("#d-output")).to_contain_text("word2", timeout=WAIT_MS)
        await expect(page.locator("#d-status")).to_have_text("PROCESSING")
        await page.screenshot(path=screenshots / "04-request-running.png", full_page=True)
        await page.get_by_role("button", name="Cancel this request").click()
        await expect(page.locator("#d-status")).to_have_text("CANCELLED", timeout=WAIT_MS)
        assert (await svc.get(llm))["status"] == "CANCELLED"
        await page.goto(f"{svc.url}/console#/requests")
        await expect(row(page, llm).locator("[data-status]")).to_have_attribute(
            "data-status", "CANCELLED", timeout=WAIT_MS
        )

        # A message the orchestrator cannot read lands in the dead-letter queue, with why.
        await svc.service.ctx.bus.publish(
            [BusMessage(RESULTS_TOPIC, "bad-key", b'{"requestId": "not-a-uuid"}')]
        )
        await page.get_by_role("link", name="Dead letters").click()
        dead = page.locator("#dlq-table tbody tr")
        await expect(dead).to_have_count(1, timeout=WAIT_MS)
        await expect(dead).to_contain_text("worker.results.dlq")
        await expect(dead).to_contain_text("requestId")
        await dead.get_by_text("Show").click()
        await page.screenshot(path=screenshots / "05-dead-letters.png", full_page=True)

        # Charts: what finished, per worker type.
        await page.get_by_role("link", name="Charts").click()
        data_charts = page.locator('[data-worker-type="data-processing"]')
        await expect(data_charts.get_by_role("img").first).to_have_attribute(
            "aria-label", "Throughput (finished per 10 s): 3 finished in the window"
        )
        await expect(page.locator('[data-worker-type="llm"] [role="img"]').first).to_have_attribute(
            "aria-label", "Throughput (finished per 10 s): 1 finished in the window"
        )
        await page.screenshot(path=screenshots / "06-charts.png", full_page=True)

        # The fleet: the built-in workers, healthy.
        await page.get_by_role("link", name="Fleet").click()
        fleet = page.locator("#fleet-table tbody tr")
        await expect(fleet).to_have_count(2)
        await expect(fleet.locator('[data-status="HEALTHY"]')).to_have_count(2)
        await page.screenshot(path=screenshots / "07-fleet.png", full_page=True)

        # A phone's width: nothing spills sideways; the controls keep their names.
        async with new_page(browser, width=390, height=844) as phone:
            await sign_in(phone, svc.url)
            await expect(row(phone, ids[0])).to_have_count(1, timeout=WAIT_MS)
            assert await phone.evaluate("document.documentElement.scrollWidth") <= 390
            await expect(phone.get_by_role("button", name="Sign out")).to_be_visible()
            await phone.screenshot(path=screenshots / "08-requests-phone.png", full_page=True)
            assert phone.errors == []  # type: ignore[attr-defined]

        # Another tenant's key sees none of those requests, no tenant column and no dead
        # letters (which hold any tenant's messages).
        async with new_page(browser) as tenant:
            await sign_in(tenant, svc.url, key=OTHER_KEY)
            await expect(tenant.locator("#requests-empty")).to_be_visible(timeout=WAIT_MS)
            await expect(row(tenant, ids[0])).to_have_count(0)
            await expect(tenant.locator("#th-tenant")).to_be_hidden()
            await expect(tenant.get_by_role("link", name="Dead letters")).to_be_hidden()
            await tenant.goto(f"{svc.url}/console#/requests/{ids[0]}")
            await expect(tenant.locator("#h-detail")).to_have_text("Request not found")
            await tenant.get_by_role("link", name="Fleet").click()
            await expect(tenant.locator("#fleet-table tbody tr")).to_have_count(2)
            assert tenant.errors == []  # type: ignore[attr-defined]

        # Sign out forgets the key.
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_label("API key")).to_be_visible()
        assert await page.evaluate("sessionStorage.getItem('enginedge.apiKey')") is None
        assert page.errors == []  # type: ignore[attr-defined]


def test_console_page_and_assets_are_served_from_the_package(tmp_path: Path) -> None:
    """No CDN: the page loads only what the service itself serves, under a strict CSP."""
    from enginedge.adapters.http.console import ASSETS

    html = (ASSETS / "index.html").read_text()
    assert "http://" not in html and "https://" not in html
    for name in ("console.js", "console.css"):
        text = (ASSETS / name).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text


async def test_console_marks_a_stopped_worker_process_unhealthy_on_any_replica(
    tmp_path: Path,
    browser: Browser,
    screenshots: Path,
    pg_url: str,
    broker: str,
    redis_url: str,
) -> None:
    """Distributed mode: PostgreSQL, a Kafka-protocol broker, Redis, two replicas and a
    worker process."""
    settings = fast_settings(
        tmp_path,
        database_url=pg_url,
        kafka_brokers=broker,
        redis_url=redis_url,
        builtin_workers="none",
        worker_heartbeat_ttl=2.0,
        health_check_interval=1.0,
    )
    env = dict(
        os.environ,
        KAFKA_BROKERS=broker,
        WORKER_HEARTBEAT_INTERVAL="0.3",
        WORKER_HEALTH_PORT=str(free_port()),
        WORKER_ADVERTISED_HOST="127.0.0.1",
        LOG_LEVEL="warn",
    )
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "enginedge", "worker", "--type", "data-processing"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with (
            run_service(settings) as one,
            run_service(settings) as two,
            new_page(browser) as page,
        ):
            # Submitted through one replica, followed on the other's console.
            await sign_in(page, two.url)
            await page.get_by_role("link", name="Fleet").click()
            healthy = page.locator('#fleet-table tbody tr [data-status="HEALTHY"]')
            await expect(healthy).to_have_count(1, timeout=30_000)
            rid = await submit(one, "data.sql", sql(7))
            await page.get_by_role("link", name="Requests").click()
            await expect(row(page, rid).locator("[data-status]")).to_have_attribute(
                "data-status", "COMPLETED", timeout=30_000
            )
            await page.get_by_role("link", name="Fleet").click()
            await page.screenshot(path=screenshots / "09-fleet-distributed.png", full_page=True)

            # Freeze the worker process: its heartbeats stop, the console says so.
            os.kill(worker.pid, signal.SIGSTOP)
            unhealthy = page.locator('#fleet-table tbody tr [data-status="UNHEALTHY"]')
            await expect(unhealthy).to_have_count(1, timeout=WAIT_MS)
            await page.screenshot(path=screenshots / "10-fleet-worker-unhealthy.png")
            async with httpx.AsyncClient() as client:
                workers = await client.get(f"{one.url}/api/workers", headers={"X-API-Key": API_KEY})
            assert [w["status"] for w in workers.json()["items"]] == ["UNHEALTHY"]
            assert page.errors == []  # type: ignore[attr-defined]
    finally:
        stop_process(worker, signal.SIGKILL)
