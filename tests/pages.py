"""What the page tests share: Debian's Chromium driven by Playwright (sync API), headless.

- :data:`CHROMIUM`, :data:`ARGS`: the browser and its launch flags; :data:`needs_chromium`,
  the mark that skips a test (or, as ``pytestmark``, a module) where it is not installed.
- :func:`chromium`: a launched browser, closed on the way out (skips if Playwright is not
  installed, or Chromium). Use it in a **module**-scoped fixture (or inside one test), never a
  session-scoped one: a running sync Playwright keeps an asyncio loop running in the thread,
  which breaks ``asyncio.run()`` in the other modules a pytest-xdist worker runs after it.
- :func:`blank_page`: a page in a fresh context of its own (:data:`DESKTOP` unless told; any
  other context option passes through), 30 s default timeout, each uncaught JavaScript error
  appended to ``errors`` (the caller asserts it empty at the end, and closes
  ``page.context``). :func:`open_page` is the same, loaded at ``url`` (:func:`load`).
- Waits: :func:`load` (go to a URL, wait until the page is ready), :func:`ready` (loaded and
  no action under way: ``data-ready='1'``, no ``data-busy``), :func:`idle` (no action under
  way, after one: ``data-busy`` gone).
- :func:`api`: one call of the server's ``/v1`` API, which must succeed; its JSON (or None).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1200, "height": 800}
#: The desktop size some of the files were written at (kept, as each test was).
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
#: The page has loaded (``data-ready``) and no action is under way (``data-busy``).
READY = "body[data-ready='1']:not([data-busy])"

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="chromium is not installed")


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium, launched through Playwright, closed on the way out."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def blank_page(browser: Any, errors: list[str], *, viewport: dict[str, int] = DESKTOP,
               **context_options: Any) -> Any:
    """A new page, alone in a new context (``page.context``: the caller closes it)."""
    context = browser.new_context(viewport=viewport, **context_options)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


def open_page(browser: Any, url: str, errors: list[str], *,
              viewport: dict[str, int] = DESKTOP, **context_options: Any) -> Any:
    """:func:`blank_page`, loaded at ``url``."""
    page = blank_page(browser, errors, viewport=viewport, **context_options)
    load(page, url)
    return page


def load(page: Any, url: str) -> None:
    """Go to ``url`` and wait until the page is ready (and shown)."""
    page.goto(url)
    page.wait_for_selector(READY)


def ready(page: Any) -> None:
    """Wait until the page has loaded and no action (nor the refresh after one) is under
    way."""
    page.wait_for_selector(READY, state="attached")


def idle(page: Any) -> None:
    """Wait until the page's last action, and the refresh after it, is done."""
    page.wait_for_selector("body:not([data-busy])", state="attached")


def api(base: str, method: str, path: str, **kwargs: Any) -> Any:
    """``METHOD {base}/v1{path}`` (60 s timeout unless told); it must succeed. Its JSON, or
    None if it has no body."""
    kwargs.setdefault("timeout", 60)
    response = httpx.request(method, f"{base}/v1{path}", **kwargs)
    assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
    return response.json() if response.content else None
