"""The page's search (search.js) in real headless Chromium (Debian's, through Playwright), against
uvicorn as `rolechat serve` runs it, in-process over the fake engine, with two API keys: Ctrl+K
opens the dialog, typing searches, Enter opens the conversation at the matched message; another
key's conversations never show; a Chinese word is found from a zh-CN browser; server text is
only ever text."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeEngine
from pages import blank_page, chromium, idle, load, needs_chromium
from rolechat.server import create_app
from rolechat.server.wire import owner_id
from rolechat.store import Store
from servers import in_process

K1, K2 = "page-search-one", "page-search-two"
XSS = '<img src=x onerror="window.__xss=1"> marigold'

ROOT = Path(__file__).resolve().parents[2]

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store = Store(tmp_path_factory.mktemp("page-search") / "rolechat.db")
    one, two = owner_id(K1), owner_id(K2)
    lights = store.create(title="Lighthouses", owner=one)
    turns = [(f"Question {i} about lighthouses?", f"Answer {i}: lamps, lenses and keepers.")
             for i in range(12)]
    turns[2] = ("What colour was the old lamp room?", "It was painted periwinkle blue.")
    found = 0
    for index, (user, reply) in enumerate(turns):
        written = store.complete_turn(lights, store.begin_turn(lights, user), reply, 5, {}).id
        if index == 2:
            found = written
    cooking = store.create(title="晚饭", owner=one)
    store.complete_turn(cooking, store.begin_turn(cooking, "我想做家常菜，有什么推荐？"),
                        "试试番茄炒蛋。", 5, {})
    garden = store.create(title="Gardening", owner=one)  # the newest of key one's
    store.complete_turn(garden, store.begin_turn(garden, XSS), "Marigolds like sun.", 5, {})
    theirs = store.create(title="Their periwinkle secret", owner=two)
    store.complete_turn(theirs, store.begin_turn(theirs, "periwinkle 家常菜"), "secret", 5, {})
    app = create_app(FakeEngine(), api_keys=[K1, K2], store=store)
    with in_process(app) as url:
        yield {"url": url, "lights": lights, "found": found, "cooking": cooking,
               "garden": garden, "theirs": theirs}
    store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def open_page(browser: Any, url: str, errors: list[str], **context: Any) -> Any:
    """The page at ``url`` in a fresh context, with key one's API key (as typed in the tab)."""
    page = blank_page(browser, errors, **context)
    page.context.add_init_script(f"sessionStorage.setItem('rolechat.apiKey', '{K1}')")
    load(page, url)
    return page


def search(page: Any, text: str) -> Any:
    page.fill("#search-input", text)
    page.wait_for_function(
        "([q]) => { const d = document.getElementById('search-dialog');"
        " return d.dataset.query === q && d.dataset.state === 'done'; }", arg=[text])
    return page.locator("#search-results [role=option]")


def test_ctrl_k_finds_another_conversation_and_opens_it_at_the_match(
        browser: Any, seeded: dict[str, Any]) -> None:
    errors: list[str] = []
    page = open_page(browser, seeded["url"], errors)
    page.click(f"#conversations [data-id='{seeded['garden']}']")
    page.wait_for_selector(".msg.assistant")
    page.focus("#input")

    page.keyboard.press("Control+k")
    dialog = page.locator("#search-dialog")
    assert dialog.is_visible()
    assert page.evaluate("document.activeElement.id") == "search-input"
    assert page.get_attribute("#search-input", "role") == "combobox"
    assert page.evaluate("document.getElementById('search-input').labels[0].textContent")

    options = search(page, "periwinkle")
    assert options.count() == 1  # key two's "periwinkle" never shows
    shots = Path(os.environ.get("ROLECHAT_ARTIFACTS") or ROOT / "test-artifacts" / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "search-dialog.png"), animations="disabled")
    assert options.first.get_attribute("data-cid") == str(seeded["lights"])
    assert options.first.get_attribute("aria-selected") == "true"
    assert page.text_content("#search-results mark") == "periwinkle"
    assert "Lighthouses" in (options.first.text_content() or "")
    assert page.get_attribute("#search-input", "aria-activedescendant") == \
        options.first.get_attribute("id")

    page.keyboard.press("Enter")
    idle(page)
    assert dialog.is_hidden()
    assert page.text_content("#title") == "Lighthouses"
    hit = page.locator(f"#messages .msg[data-id='{seeded['found']}']")
    hit.wait_for()
    assert "periwinkle" in (hit.text_content() or "") and "search-found" in (
        hit.get_attribute("class") or "")
    assert page.evaluate("document.activeElement.dataset.id") == str(seeded["found"])
    # Opened at the match: the message is in view, not scrolled past as the newest turn is.
    assert page.evaluate("""([id]) => {
        const box = document.getElementById('messages').getBoundingClientRect();
        const r = document.querySelector(`#messages .msg[data-id="${id}"]`)
          .getBoundingClientRect();
        return r.top >= box.top && r.bottom <= box.bottom
          && document.getElementById('messages').scrollTop
             < document.getElementById('messages').scrollHeight
               - document.getElementById('messages').clientHeight - 50; }""",
                         [seeded["found"]])

    # The sidebar's button opens it too; arrows move, Esc closes and focus goes back.
    page.click("#search-open")
    assert dialog.is_visible()
    options = search(page, "e")  # one character: the LIKE scan, several hits
    assert options.count() >= 3
    assert str(seeded["theirs"]) not in {options.nth(i).get_attribute("data-cid")
                                         for i in range(options.count())}
    page.keyboard.press("ArrowDown")
    assert options.nth(1).get_attribute("aria-selected") == "true"
    assert options.first.get_attribute("aria-selected") == "false"
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")  # wraps to the last
    assert options.last.get_attribute("aria-selected") == "true"
    page.keyboard.press("Escape")
    assert dialog.is_hidden()
    assert page.evaluate("document.activeElement.id") == "search-open"

    # Server text is only text: markup in a matched message is shown, never run.
    page.keyboard.press("Control+k")
    search(page, "marigold")
    assert page.locator("#search-results img").count() == 0
    assert "<img" in (page.text_content("#search-results") or "")
    page.screenshot(path=str(shots / "search-results.png"), animations="disabled")
    assert page.evaluate("typeof window.__xss") == "undefined"
    nothing = search(page, "zeppelin")
    assert nothing.count() == 0 and "zeppelin" in (page.text_content("#search-status") or "")
    page.keyboard.press("Escape")
    assert not errors, errors
    page.context.close()


def test_a_chinese_word_is_found_from_a_zh_cn_browser(browser: Any,
                                                     seeded: dict[str, Any]) -> None:
    errors: list[str] = []
    page = open_page(browser, seeded["url"], errors, locale="zh-CN")
    assert page.evaluate("navigator.language") == "zh-CN"
    page.keyboard.press("Control+k")
    options = search(page, "家常菜")
    assert options.count() == 1 and options.first.get_attribute("data-cid") == str(
        seeded["cooking"])
    assert page.text_content("#search-results mark") == "家常菜"
    assert "晚饭" in (options.first.text_content() or "")
    assert search(page, "菜").count() == 1  # one character
    page.keyboard.press("Enter")
    idle(page)
    assert page.text_content("#title") == "晚饭"
    page.wait_for_selector("#messages .msg.search-found")
    shots = Path(os.environ.get("ROLECHAT_ARTIFACTS") or ROOT / "test-artifacts" / "screenshots")
    page.screenshot(path=str(shots / "search-found-zh.png"))
    assert "家常菜" in (page.text_content("#messages .msg.search-found") or "")
    assert not errors, errors
    page.context.close()
