"""The web page by keyboard, and what it tells a screen reader, in real headless Chromium against
a real ``rolechat serve`` with the embedded model: Esc stops a reply, Ctrl+Shift+O starts a new
chat, "?" lists the shortcuts; the conversation list is made of buttons with ``aria-current``;
the tab is titled after the conversation; a finished reply is announced once; copy buttons are
named for what they copy; code blocks and the prompt text take focus; the vendored scripts name
no missing source map."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pages import PHONE, WIDE, chromium, idle, needs_chromium, open_page
from rolechat.store import Store
from servers import rolechat_serve

STATIC = Path(__file__).resolve().parents[2] / "src/rolechat/server/static"
CODE_REPLY = ("Like **this**:\n\n```python\nimport os\nprint(len(os.sep), 'hi')  # a comment\n```"
              "\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
#: Headings as a model writes them: levels skipped, deeper than the page's outline allows.
HEADINGS_REPLY = "# Title\n\nSome text.\n\n### Deep\n\n## Back\n\n###### Deepest\n\nThe end."
AXE = Path(__file__).resolve().parents[1] / "vendor/axe-core/axe.min.js"

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("page-keys-home")
    store = Store(home / "rolechat.db")
    headed = store.create(title="Seeded headings")
    store.complete_turn(headed, store.begin_turn(headed, "Outline it."), HEADINGS_REPLY, 20, {})
    cid = store.create(title="Seeded code")
    uid = store.begin_turn(cid, "Show me code.")
    store.complete_turn(cid, uid, CODE_REPLY, 12, {})
    store.interrupt_turn(store.begin_turn(cid, "this one was cut off"))
    store.close()
    with rolechat_serve(home) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    errors: list[str] = []
    opened = open_page(browser, server, errors, viewport=WIDE, color_scheme="light")
    yield opened
    opened.context.close()
    assert not errors, errors


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
    # The reply shows as stopped (once the stop is stored: a follow event may re-render it),
    # and only once: its last words, which the server sends as it stops, are not shown again
    # as a reply being written.
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('[data-testid=msg-assistant]')].pop();"
        " return r && (r.className + r.innerText.toLowerCase()).includes('interrupted'); }")
    assert "interrupted" in (reply.get_attribute("class") or "") + reply.inner_text().lower()
    assert page.locator(".msg.live").count() == 0 and page.is_hidden("[data-testid=stop]")
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
    # the menu: opened from the keyboard, its first item focused, arrows move, Esc closes
    page.locator("#conv-menu summary").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("document.activeElement.id === 'rename'")
    page.keyboard.press("ArrowDown")
    assert page.evaluate("document.activeElement.id") == "memory-toggle"
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.id") == "export-json"
    page.keyboard.press("ArrowDown")  # round to the first
    assert page.evaluate("document.activeElement.id") == "rename"
    page.keyboard.press("ArrowUp")
    assert page.evaluate("document.activeElement.id") == "export-json"
    page.keyboard.press("Escape")
    assert not page.locator("#conv-menu .menu-items").is_visible()

    page.locator("#input").focus()
    page.keyboard.press("?")  # typing a question mark in the message box is just text
    assert not dialog.is_visible() and page.input_value("#input").endswith("?")


def tab_to(page: Any, selector: str, limit: int = 60) -> None:
    """Press Tab until the element ``selector`` names has the focus (keyboard only)."""
    for _ in range(limit):
        if page.evaluate(f"document.activeElement?.matches({selector!r}) ?? false"):
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {selector}")


def test_the_keyboard_alone_searches_switches_renames_and_exports(page: Any, server: str) -> None:
    # Search: Ctrl+K, type, Enter opens the conversation at the match.
    page.keyboard.press("Control+k")
    page.wait_for_selector("[data-testid=search-dialog][open]")
    page.keyboard.type("comment")
    page.wait_for_selector("[data-testid=search-results] [role=option]")
    page.keyboard.press("Enter")
    page.wait_for_function("document.title === 'Seeded code · rolechat'")
    idle(page)
    # Switch: Ctrl+Shift+O for a new chat, then Tab to the seeded one in the list and Enter.
    page.keyboard.press("Control+Shift+O")
    page.wait_for_function("document.title === 'rolechat'")
    page.locator("body").focus()
    tab_to(page, "#conversations button.conv-text")
    while "Seeded code" not in page.evaluate("document.activeElement.innerText"):
        page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_function("document.title === 'Seeded code · rolechat'")
    idle(page)
    # Rename: Tab to the menu, Enter, Enter on Rename…, type, Enter.
    tab_to(page, "#conv-menu summary")
    page.keyboard.press("Enter")
    page.wait_for_function("document.activeElement.id === 'rename'")
    page.keyboard.press("Enter")
    page.wait_for_function("document.activeElement.id === 'title-input'")
    page.keyboard.press("Control+a")
    page.keyboard.type("Renamed by keys")
    page.keyboard.press("Enter")
    page.wait_for_function("document.title === 'Renamed by keys · rolechat'")
    idle(page)
    # Export: the menu again, End (the JSON export), Enter: a file comes.
    tab_to(page, "#conv-menu summary")
    page.keyboard.press("Enter")
    page.wait_for_function("document.activeElement.id === 'rename'")
    page.keyboard.press("End")
    with page.expect_download() as downloading:
        page.keyboard.press("Enter")
    exported = Path(downloading.value.path()).read_text(encoding="utf-8")
    assert '"title": "Renamed by keys"' in exported and "a comment" in exported
    cid = page.evaluate("location.hash.slice(3)")  # the other tests find it by its title
    httpx.patch(f"{server}/v1/conversations/{cid}", json={"title": "Seeded code"}, timeout=30)


def test_replies_are_announced_once_and_controls_are_named(page: Any) -> None:
    page.locator("#conversations button.conv-text", has_text="Seeded code").click()
    idle(page)
    copies = page.locator("[data-testid=msg-assistant] [data-testid=copy]")
    assert copies.first.get_attribute("aria-label") == "Copy reply"
    user_copy = page.locator("[data-testid=msg-user] [data-testid=copy]").first
    assert user_copy.get_attribute("aria-label") == "Copy your message"
    code_copy = page.locator("[data-testid=copy-code]").first
    assert code_copy.get_attribute("aria-label") == "Copy code (python)"
    code = page.locator("[data-testid=msg-assistant] pre code").first
    assert code.get_attribute("tabindex") == "0" and code.get_attribute("role") == "region"
    code.focus()
    assert page.evaluate("document.activeElement.tagName") == "CODE"
    assert page.get_attribute("#prompt-text", "tabindex") == "0"

    # in a chat of its own: the model's words are not the seeded conversation the a11y
    # checks read
    page.keyboard.press("Control+Shift+O")
    page.wait_for_function("document.title === 'rolechat'")
    page.fill("#input", "Say hello.")
    page.keyboard.press("Enter")
    page.wait_for_selector("[data-testid=stop]", state="hidden")
    idle(page)
    page.wait_for_function("(document.querySelector('#announcer') || {}).textContent")
    said = page.locator("#announcer").inner_text()
    reply = page.locator("[data-testid=msg-assistant]").last.locator(".content").inner_text()
    words = " ".join(reply.split())
    assert said.startswith("Reply finished: ") and " ".join(said.split())[16:][:40] == words[:40]
    # the only live regions: the announcer, and the page's status lines; never the messages
    live = page.evaluate("[...document.querySelectorAll('[aria-live]')].map(e => e.id ||"
                         " e.dataset.testid || e.className)")
    assert "announcer" in live
    assert page.evaluate("!!document.querySelector('#messages [aria-live]:not(.waiting)')"
                         " === false")


def test_the_vendored_scripts_name_no_missing_source_map() -> None:
    for script in STATIC.glob("vendor/**/*.js"):
        assert "sourceMappingURL" not in script.read_text(encoding="utf-8"), script


def violations(page: Any) -> list[str]:
    """What axe-core (vendored: tests/vendor/axe-core) finds on the page as it is now."""
    if not page.evaluate("typeof window.axe === 'object'"):
        page.add_script_tag(content=AXE.read_text(encoding="utf-8"))
    found: list[str] = page.evaluate("""async () => (await axe.run(document, {
        resultTypes: ['violations']})).violations.flatMap(v => v.nodes.map(n =>
        v.id + ' ' + n.target.join(' ') + ': ' + n.failureSummary))""")
    return found


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
@pytest.mark.parametrize("viewport", [WIDE, PHONE], ids=["desktop", "phone"])
def test_axe_finds_nothing_on_the_page_its_panels_and_its_menu(
        browser: Any, server: str, viewport: dict[str, int], color_scheme: str) -> None:
    errors: list[str] = []
    page = open_page(browser, server, errors, viewport=viewport, color_scheme=color_scheme)
    assert violations(page) == [], "empty page"
    if viewport is PHONE:
        page.click("#sidebar-toggle")
        page.wait_for_selector("#sidebar button.conv-text", state="visible")
        assert violations(page) == [], "the drawer open"
    page.locator("#conversations button.conv-text", has_text="Seeded code").click()
    idle(page)
    page.wait_for_selector("[data-testid=msg-assistant] pre")
    assert violations(page) == [], "a conversation (code, a table, an interrupted message)"
    page.click("#system-toggle")
    page.click("#prompt-toggle")
    page.wait_for_selector("#prompt-text:not(:empty)")
    assert violations(page) == [], "the system and prompt panels open"
    page.click("#conv-menu summary")
    page.wait_for_selector("#conv-menu .menu-items", state="visible")
    assert violations(page) == [], "the menu open"
    page.context.close()
    assert not errors, errors


def test_a_replys_headings_fit_the_pages_outline(browser: Any, server: str) -> None:
    """A model skips heading levels and starts at "#"; the page's outline is h1 (the page), h2
    (its sections): a reply's headings start at h3 and never skip a level (what a screen
    reader lists, and axe's heading-order), each looking like the level written."""
    errors: list[str] = []
    page = open_page(browser, server, errors)
    page.locator("#conversations button.conv-text", has_text="Seeded headings").click()
    idle(page)
    page.wait_for_selector("[data-testid=msg-assistant] .content h3")
    headings = page.evaluate("""[...document.querySelectorAll(
        '[data-testid=msg-assistant] .content :is(h1, h2, h3, h4, h5, h6)')].map(
        h => [h.tagName, h.dataset.level, h.innerText])""")
    assert headings == [["H3", "1", "Title"], ["H4", "3", "Deep"], ["H4", "2", "Back"],
                        ["H5", "6", "Deepest"]]
    sizes = page.evaluate("""[...document.querySelectorAll(
        '[data-testid=msg-assistant] .content :is(h3, h4, h5)')].map(
        h => parseFloat(getComputedStyle(h).fontSize))""")
    assert sizes[0] > sizes[2] > sizes[1] == sizes[3]  # "#" largest, then "##"
    assert violations(page) == []
    page.context.close()
    assert not errors, errors
