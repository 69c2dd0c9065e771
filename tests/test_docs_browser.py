"""The /docs page as a person uses it: headless Debian chromium driven by Playwright.

Opens /docs on the real server, expands each fit, clicks "Try it out" and "Execute", and reads
the rendered response. Every request the page makes must stay on the service's own origin.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.server import Server

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Locator, Page

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]

if CHROMIUM is None:
    pytest.skip(
        "browser test skipped: Debian's `chromium` package is not installed "
        "(apt-get install chromium)",
        allow_module_level=True,
    )

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    with (
        tempfile.TemporaryDirectory(prefix="tapefit-chromium-") as profile,
        sync_api.sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1600},
        )
        yield context
        context.close()


@pytest.mark.parametrize(
    ("operation", "param"),
    [("fit_linear", "slope"), ("fit_gaussian", "std")],
)
def test_try_it_out_executes_a_fit(
    live_server: Server, browser: BrowserContext, operation: str, param: str
) -> None:
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{live_server.url}/docs", wait_until="networkidle")

    block = page.locator(f"#operations-fits-{operation}")
    live = _execute(page, f"#operations-fits-{operation}")
    body_text = live.locator("tr.response .highlight-code pre").first.inner_text()
    body = json.loads(body_text)
    assert param in body["params"]
    assert body["epochs_run"] == len(body["loss_history"]) > 0

    ARTIFACTS.mkdir(exist_ok=True)
    block.screenshot(path=str(ARTIFACTS / f"docs-{operation}.png"))
    page.set_viewport_size({"width": 900, "height": 1200})
    live.screenshot(path=str(ARTIFACTS / f"docs-{operation}-response.png"))
    page.close()

    foreign = [url for url in requested if not url.startswith((live_server.url, "data:", "blob:"))]
    assert not foreign, f"the docs page reached outside the service: {foreign}"
    assert any("/static-offline-docs/swagger-ui-bundle.js" in url for url in requested)


def test_redoc_renders_offline(live_server: Server, browser: BrowserContext) -> None:
    page = browser.new_page()
    fetched: list[str] = []
    blocked: list[tuple[str, str]] = []
    page.on("requestfinished", lambda request: fetched.append(request.url))
    page.on("requestfailed", lambda r: blocked.append((r.url, r.failure or "")))
    page.goto(f"{live_server.url}/redoc", wait_until="networkidle")
    heading = page.get_by_role("heading", name="Fit a line by gradient descent on the MSE")
    heading.wait_for(timeout=30_000)
    assert not [url for url in fetched if not url.startswith((live_server.url, "data:", "blob:"))]
    # ReDoc's bundle asks for its logo on a CDN; the page's Content-Security-Policy stops it
    # in the browser, so nothing leaves the machine.
    for url, failure in blocked:
        assert url.startswith(live_server.url) or failure.lower() in {
            "csp",
            "net::err_blocked_by_csp",
        }, (
            url,
            failure,
        )
    page.close()


def _execute(page: Page, block_id: str) -> Locator:
    block = page.locator(block_id)
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    live = block.locator(".live-responses-table")
    status = live.locator("tr.response td.response-col_status").first
    status.wait_for(timeout=30_000)
    assert status.inner_text().strip().startswith("200")
    return live


def test_try_it_out_makes_data_and_draws_a_plot(
    live_server: Server, browser: BrowserContext
) -> None:
    page = browser.new_page()
    page.goto(f"{live_server.url}/docs", wait_until="networkidle")

    live = _execute(page, "#operations-datasets-linear_dataset")
    data = json.loads(live.locator("tr.response .highlight-code pre").first.inner_text())
    assert len(data["x"]) == len(data["y"]) == 100

    live = _execute(page, "#operations-plots-plot_linear")
    image = live.locator("tr.response img").first
    image.wait_for(timeout=30_000)
    loaded = "img => img.complete && img.naturalWidth > 0"
    page.wait_for_function(loaded, arg=image.element_handle(), timeout=10_000)
    size = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [1200, 400]  # Swagger UI decoded the PNG
    ARTIFACTS.mkdir(exist_ok=True)
    live.screenshot(path=str(ARTIFACTS / "docs-plot-linear-response.png"))
    page.close()
