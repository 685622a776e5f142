"""The web page by keyboard, and what it tells a screen reader, in real headless Chromium against
a real ``rolechat serve`` with the embedded model: Esc stops a reply, Ctrl+Shift+O starts a new
chat, "?" lists the shortcuts; the conversation list is made of buttons with ``aria-current``;
the tab is titled after the conversation; a finished reply is announced once; copy buttons are
named for what they copy; code blocks and the prompt text take focus; the vendored scripts name
no missing source map."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rolechat.store import Store
from servers import rolechat_serve

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
STATIC = Path(__file__).resolve().parents[2] / "src/rolechat/server/static"
CODE_REPLY = "Like this:\n\n```python\nprint('hi')\n```\n"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("page-keys-home")
    store = Store(home / "rolechat.db")
    cid = store.create(title="Seeded code")
    uid = store.begin_turn(cid, "Show me code.")
    store.complete_turn(cid, uid, CODE_REPLY, 12, {})
    store.close()
    with rolechat_serve(home) as base:
        yield base


@pytest.fixture
def page(server: str) -> Iterator[Any]:
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        opened = context.new_page()
        opened.set_default_timeout(30_000)
        opened.on("pageerror", lambda exc: errors.append(str(exc)))
        opened.goto(server)
        opened.wait_for_selector("body[data-ready='1']:not([data-busy])")
        yield opened
        browser.close()
    assert not errors, errors


def idle(page: Any) -> None:
    page.wait_for_selector("body:not([data-busy])", state="attached")


def test_the_keyboard_alone_sends_stops_and_starts_a_new_chat(page: Any) -> None:
    page.locator("#max-tokens").fill("400")  # a reply long enough to stop halfway
    page.locator("#input").focus()
    page.keyboard.type("Write a very long story about a lighthouse keeper and the sea.")
    page.keyboard.press("Enter")
    reply = page.locator("[data-testid=msg-assistant]").last
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('[data-testid=msg-assistant]')].pop();"
        " return r && r.innerText.trim().split(/\\s+/).length >= 3; }")
    page.keyboard.press("Escape")  # stops the reply being written
    page.wait_for_selector("[data-testid=stop]", state="hidden")
    idle(page)
    assert "interrupted" in (reply.get_attribute("class") or "") + reply.inner_text().lower()
    title = page.locator("#title").inner_text()
    assert page.title() == f"{title} · rolechat" and title != "New conversation"

    # the conversation list: buttons, the open one marked current
    current = page.locator("#conversations button[aria-current=page]")
    assert current.count() == 1 and title in current.inner_text()

    page.keyboard.press("Control+Shift+O")
    page.wait_for_function("document.querySelector('#title').innerText === 'New conversation'")
    assert page.title() == "rolechat"
    assert page.locator("#conversations [aria-current]").count() == 0

    # open the seeded conversation by keyboard: focus its button, Enter
    page.locator("#conversations button.conv-text", has_text="Seeded code").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("document.title === 'Seeded code · rolechat'")

    # "?" outside a text field lists the shortcuts; Esc closes the list
    page.locator("#conversations button.conv-text", has_text="Seeded code").focus()
    page.keyboard.press("?")
    dialog = page.locator("[data-testid=shortcuts]")
    assert dialog.is_visible() and "Ctrl+Shift+O" in dialog.inner_text()
    page.keyboard.press("Escape")
    assert not dialog.is_visible()
    page.locator("#input").focus()
    page.keyboard.press("?")  # typing a question mark in the message box is just text
    assert not dialog.is_visible() and page.input_value("#input").endswith("?")


def test_replies_are_announced_once_and_controls_are_named(page: Any) -> None:
    page.locator("#conversations button.conv-text", has_text="Seeded code").click()
    idle(page)
    copies = page.locator("[data-testid=msg-assistant] [data-testid=copy]")
    assert copies.first.get_attribute("aria-label") == "Copy reply"
    user_copy = page.locator("[data-testid=msg-user] [data-testid=copy]").first
    assert user_copy.get_attribute("aria-label") == "Copy your message"
    code_copy = page.locator("[data-testid=copy-code]").first
    assert code_copy.get_attribute("aria-label") == "Copy code (python)"
    pre = page.locator("[data-testid=msg-assistant] pre").first
    assert pre.get_attribute("tabindex") == "0" and pre.get_attribute("role") == "region"
    pre.focus()
    assert page.evaluate("document.activeElement.tagName") == "PRE"
    assert page.get_attribute("#prompt-text", "tabindex") == "0"

    page.fill("#input", "Say hello.")
    page.keyboard.press("Enter")
    page.wait_for_selector("[data-testid=stop]", state="hidden")
    idle(page)
    page.wait_for_function("(document.querySelector('#announcer') || {}).textContent")
    said = page.locator("#announcer").inner_text()
    reply = page.locator("[data-testid=msg-assistant]").last.locator(".content").inner_text()
    assert said.startswith("Reply finished: ") and said.split(": ", 1)[1][:20] == reply[:20]
    # the only live regions: the announcer, and the page's status lines; never the messages
    live = page.evaluate("[...document.querySelectorAll('[aria-live]')].map(e => e.id ||"
                         " e.dataset.testid || e.className)")
    assert "announcer" in live
    assert page.evaluate("!!document.querySelector('#messages [aria-live]:not(.waiting)')"
                         " === false")


def test_the_vendored_scripts_name_no_missing_source_map() -> None:
    for script in STATIC.glob("vendor/**/*.js"):
        assert "sourceMappingURL" not in script.read_text(encoding="utf-8"), script
