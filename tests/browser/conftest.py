"""Fixtures of the browser tests: Debian's Chromium driven by Playwright, a fresh page per test, and a folder per test
for screenshots, where a failed test leaves one of its page and the page's console."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, Playwright, async_playwright

# The binary itself, not Debian's /usr/bin/chromium: that is a shell script which sources /etc/chromium.d (extension
# and GPU flags, API keys, a /dev/shm check that errors out where findmnt prints two lines) before it execs this. With
# the binary the flags are Playwright's and ours only, whatever a machine's /etc holds. Playwright never downloads a
# browser here: `make system-deps` installs Debian's `chromium` package, and the Makefile checks this same path.
CHROMIUM = "/usr/lib/chromium/chromium"

# Playwright adds both of these by default today; they are named so that the tests do not depend on its defaults.
LAUNCH_ARGS = [
    # The tests run as root in a container, where Chromium's sandbox cannot start (it refuses root without this).
    "--no-sandbox",
    # A container's /dev/shm may be Docker's 64 MB, too small for the renderer; /tmp instead.
    "--disable-dev-shm-usage",
]

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Each phase's report, kept on the test for the page fixture's teardown: only it knows whether the test failed.
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """A folder of the test's own for screenshots and other files it wants to keep; its path is printed (pytest -s
    shows it, and so does a failed test's report)."""
    path = tmp_path / "browser"
    path.mkdir()
    print(f"\nbrowser artifacts: {path}")
    return path


@pytest.fixture
async def playwright() -> AsyncIterator[Playwright]:
    async with async_playwright() as p:
        yield p


@pytest.fixture
async def browser(playwright: Playwright) -> AsyncIterator[Browser]:
    """A headless Chromium per test. Per test, not per session: an async fixture lives on its own event loop, and a
    shared browser would tie every browser test (and its other async fixtures) to one session-wide loop. Playwright's
    driver and the browser start in about half a second, a context and page in 0.2 s more."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium is not installed ({CHROMIUM} is missing): `make system-deps` installs it", pytrace=False)
    b = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def page(browser: Browser, artifacts: Path, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A page in a new browser context (no cookies, storage or cache from another test). When the test fails, its
    screenshot and the page's console messages and errors are saved in `artifacts`."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        console: list[str] = []

        def on_console(msg: ConsoleMessage) -> None:
            console.append(f"{msg.type}: {msg.text}")

        def on_error(err: Error) -> None:
            console.append(f"pageerror: {err}")

        page.on("console", on_console)
        page.on("pageerror", on_error)
        yield page
        if any(r.failed for r in request.node.stash.get(_REPORTS, {}).values()):
            await _save_failure(page, artifacts, console)
    finally:
        await context.close()


async def _save_failure(page: Page, folder: Path, console: list[str]) -> None:
    (folder / "console.log").write_text("".join(f"{line}\n" for line in console))
    shot = folder / "failure.png"
    try:
        # Bounded: a page that hangs must not turn the test's failure into a timeout of its teardown.
        await page.screenshot(path=shot, full_page=True, timeout=5000)
    except Error as e:
        # The test's own failure is what the report must show; the missing screenshot is only noted.
        print(f"\nno screenshot of the failed test's page: {e}")
    else:
        print(f"\nscreenshot of the failed test's page: {shot}")
    print(f"page console: {folder / 'console.log'} ({page.url})")
