"""The Settings panel, Continue, Undo and Redo in real headless Chromium (uvicorn in-process
over the fake engine): the panel shows the open conversation's persona, system prompt and
parameters with where each comes from; a change applies to the next reply and an emptied field
goes back to its default; the persona a new conversation gets without a choice is named, its
system prompt shown. A reply cut at max new tokens offers Continue, which appends to it. Undo
puts the message back in the box, and Redo puts the turn back as it was."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes import FakeEngine
from pages import WIDE, chromium, needs_chromium, open_page, ready
from rolechat.persona import get_persona
from rolechat.server import create_app
from rolechat.store import Store
from servers import in_process

pytestmark = needs_chromium


ENGINE = FakeEngine()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = Store(tmp_path_factory.mktemp("page-settings") / "rolechat.db")
    with in_process(create_app(ENGINE, store=store)) as base:
        yield base
    store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Any, url: str) -> Iterator[Any]:
    errors: list[str] = []
    opened = open_page(browser, url, errors, viewport=WIDE)
    yield opened
    opened.context.close()
    assert not errors, errors


def last_reply_is(page: Any, text: str) -> None:
    """The last reply shown says ``text`` (waited for: a follow event may re-render it); if
    not, what the page shows, to tell a wrong reply from an error."""
    try:
        page.wait_for_function(
            "(text) => { const c = [...document.querySelectorAll('.msg.assistant .content')]"
            ".pop(); return c && c.innerText.trim() === text; }", arg=text, timeout=10_000)
    except Exception:
        shown = page.inner_text("#messages")
        error = page.inner_text("#error") if page.is_visible("#error") else ""
        raise AssertionError(f"the last reply is not {text!r}: {shown!r} {error!r}") from None


def chatted(page: Any, text: str = "Hi.") -> int:
    """Send ``text`` in a new conversation and wait for its reply; the conversation's id."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    ready(page)
    return int(page.evaluate("location.hash.slice(3)"))


def open_panel(page: Any) -> None:
    """Open the Settings panel and wait until it shows the conversation's parameters."""
    page.click("#system-toggle")
    page.wait_for_selector("#params-box:not([hidden])")
    ready(page)


def params(url: str, cid: int) -> dict[str, tuple[Any, str]]:
    body = httpx.get(f"{url}/v1/conversations/{cid}/params", timeout=30).json()
    return {name: (p["value"], p["source"]) for name, p in body["params"].items()}


def test_the_panel_shows_and_changes_the_open_conversations_parameters(
        url: str, page: Any) -> None:
    default = get_persona(None)
    # Nothing chosen: the default persona, named, and its system prompt.
    assert page.inner_text("#persona-default") == f"{default.name} (default)"
    page.click("#system-toggle")
    assert page.input_value("#system-input") == (default.system or "")
    assert page.is_hidden("#params-box")  # a conversation's, once it exists
    page.click("#system-toggle")

    page.fill("#input", "Hello there.")
    page.press("#input", "Enter")
    ready(page)
    cid = int(page.evaluate("location.hash.slice(3)"))
    page.click("#system-toggle")
    page.wait_for_selector("#params-box:not([hidden])")
    ready(page)
    assert f"persona: {default.name}" in page.inner_text("#params-persona")
    assert page.input_value("#param-temperature") == "0.9"
    assert page.inner_text("[data-testid=param-source-temperature]") == "rolechat's default"
    assert page.input_value("#param-max_new_tokens") == "512"

    page.fill("#param-temperature", "0.3")
    page.fill("#param-max_new_tokens", "3")
    page.click("#system-save")
    ready(page)
    assert params(url, cid)["temperature"] == (0.3, "you")
    assert params(url, cid)["max_new_tokens"] == (3, "you")
    assert params(url, cid)["top_p"][1] == "rolechat"  # untouched fields are not written
    # The next reply uses them: cut after 3 tokens.
    page.fill("#input", "Again.")
    page.press("#input", "Enter")
    ready(page)
    last_reply_is(page, "ech")
    page.click("#system-toggle")
    page.wait_for_selector("#params-box:not([hidden])")
    ready(page)
    assert page.inner_text("[data-testid=param-source-temperature]") == "set here"
    # Emptied: back to its default.
    page.fill("#param-max_new_tokens", "")
    page.click("#system-save")
    ready(page)
    assert params(url, cid)["max_new_tokens"] == (512, "rolechat")
    assert params(url, cid)["temperature"] == (0.3, "you")


def test_a_bad_value_is_refused_with_the_servers_reason(url: str, page: Any) -> None:
    cid = chatted(page)
    open_panel(page)
    page.fill("#param-temperature", "7")
    page.click("#system-save")
    ready(page)
    assert page.is_visible("#error") and "temperature" in page.inner_text("#error")
    assert params(url, cid)["temperature"] == (0.9, "rolechat")
    assert page.is_visible("#system-panel")  # what was typed is still there to fix


def test_what_is_typed_in_the_panel_survives_a_change_made_elsewhere(
        url: str, page: Any) -> None:
    """The page follows the conversation: a change by another writer (here a rename through
    the API) refreshes it, the open Settings panel too, but what the user is typing there
    stays, and is what Save stores."""
    cid = chatted(page)
    open_panel(page)
    page.fill("#system-input", "Typed here.")
    page.fill("#param-max_new_tokens", "7")
    renamed = httpx.patch(f"{url}/v1/conversations/{cid}", json={"title": "Renamed elsewhere"},
                          timeout=30)
    assert renamed.status_code == 200, renamed.text
    page.wait_for_function("document.querySelector('#title').textContent === 'Renamed elsewhere'")
    ready(page)
    assert page.input_value("#system-input") == "Typed here."
    assert page.input_value("#param-max_new_tokens") == "7"
    page.click("#system-save")
    ready(page)
    stored = httpx.get(f"{url}/v1/conversations/{cid}", timeout=30).json()
    assert stored["system"] == "Typed here." and stored["title"] == "Renamed elsewhere"
    assert params(url, cid)["max_new_tokens"] == (7, "you")
    # Opened again, the panel shows what is stored.
    page.click("#system-toggle")
    page.wait_for_selector("#params-box:not([hidden])")
    ready(page)
    assert page.input_value("#system-input") == "Typed here."
    assert page.input_value("#param-max_new_tokens") == "7"


def test_a_rename_being_typed_survives_a_message_sent_elsewhere(url: str, page: Any) -> None:
    page.fill("#input", "Hi.")
    page.press("#input", "Enter")
    ready(page)
    cid = int(page.evaluate("location.hash.slice(3)"))
    page.click("[data-testid=menu]")
    page.click("[data-testid=rename]")
    page.fill("#title-input", "Mine")
    sent = httpx.post(f"{url}/v1/conversations/{cid}/messages",
                      json={"content": "From elsewhere."}, timeout=30)
    assert sent.status_code == 200, sent.text
    page.wait_for_selector(".msg.user >> text=From elsewhere.")  # the page followed it
    ready(page)
    assert page.is_visible("#title-input") and page.input_value("#title-input") == "Mine"
    page.press("#title-input", "Enter")
    ready(page)
    assert page.text_content("#title") == "Mine"
    assert httpx.get(f"{url}/v1/conversations/{cid}", timeout=30).json()["title"] == "Mine"


def test_a_cut_reply_offers_continue_which_appends_to_it(url: str, page: Any) -> None:
    cid = httpx.post(f"{url}/v1/conversations", json={"params": {"max_new_tokens": 6}},
                     timeout=30).json()["id"]
    page.goto(f"{url}/#c={cid}")
    page.reload()  # a new hash alone does not load the page again
    ready(page)
    ENGINE.replies.append("Once upon a time")
    page.fill("#input", "A story?")
    page.press("#input", "Enter")
    ready(page)
    reply = page.locator(".msg.assistant").last
    assert reply.locator(".content").inner_text().strip() == "Once u"
    ENGINE.replies.append("pon a time.")
    page.click("[data-testid=continue]")
    ready(page)
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.assistant .content").inner_text().strip() == "Once upon a"
    stored = httpx.get(f"{url}/v1/conversations/{cid}", timeout=30).json()["messages"]
    assert [m["content"] for m in stored] == ["A story?", "Once upon a "]
    # Cut again (6 more tokens): it may go on once more; a finished one may not.
    assert page.locator("[data-testid=continue]").count() == 1
    ENGINE.replies.append("end.")
    page.click("[data-testid=continue]")
    ready(page)
    assert page.locator(".msg.assistant .content").inner_text().strip() == "Once upon a end."
    assert page.locator("[data-testid=continue]").count() == 0


def test_undo_puts_the_message_back_in_the_box_and_redo_undoes_it(url: str, page: Any) -> None:
    ENGINE.replies.extend(["First answer.", "Second answer."])
    for text in ("First question?", "Second question?"):
        page.fill("#input", text)
        page.press("#input", "Enter")
        ready(page)
    cid = int(page.evaluate("location.hash.slice(3)"))
    before = httpx.get(f"{url}/v1/conversations/{cid}", timeout=30).json()["messages"]
    page.click("[data-testid=undo]")
    ready(page)
    assert page.input_value("#input") == "Second question?"
    assert page.locator(".msg.user .content").all_text_contents() == ["First question?"]
    assert "back in the box" in page.inner_text("#notice")
    page.click("[data-testid=redo]")
    ready(page)
    assert page.input_value("#input") == ""
    assert page.locator(".msg.user .content").all_text_contents() == [
        "First question?", "Second question?"]
    after = httpx.get(f"{url}/v1/conversations/{cid}", timeout=30).json()["messages"]
    assert [(m["id"], m["content"]) for m in after] == [(m["id"], m["content"]) for m in before]
    assert page.locator("[data-testid=undo]").count() == 1  # the last turn again


def test_editing_an_old_message_makes_a_version_that_survives_a_reload(
        url: str, page: Any) -> None:
    ENGINE.replies.extend(["A one.", "A two.", "A three.", "A two, again."])
    for text in ("Q one?", "Q two?", "Q three?"):
        page.fill("#input", text)
        page.press("#input", "Enter")
        ready(page)
    cid = int(page.evaluate("location.hash.slice(3)"))
    # Edit the second message (not the last): what followed it stays as the old version.
    page.locator(".msg.user").nth(1).locator("[data-testid=edit]").click()
    assert page.input_value("#input") == "Q two?" and page.is_visible("#edit-banner")
    page.fill("#input", "Q two, edited?")
    page.press("#input", "Enter")
    ready(page)
    texts = page.locator(".msg .content").all_inner_texts()
    assert [t.strip() for t in texts] == ["Q one?", "A one.", "Q two, edited?", "A two, again."]
    switcher = page.locator(".msg.user").nth(1).locator(".version-of")
    assert switcher.inner_text() == "2/2"
    # The prompt view shows the branch shown.
    page.click("#prompt-toggle")
    page.wait_for_selector("#prompt-text:not(:empty)")
    ready(page)
    prompt = page.inner_text("#prompt-text")
    assert "Q two, edited?" in prompt and "Q three?" not in prompt
    page.click("#prompt-toggle")
    # Back to the first version, then a reload: the same branch and text come back.
    page.locator(".msg.user").nth(1).locator("[data-testid=version-prev]").click()
    ready(page)
    page.reload()
    ready(page)
    texts = page.locator(".msg .content").all_inner_texts()
    assert [t.strip() for t in texts] == ["Q one?", "A one.", "Q two?", "A two.", "Q three?",
                                          "A three."]
    assert page.locator(".msg.user").nth(1).locator(".version-of").inner_text() == "1/2"
    stored = httpx.get(f"{url}/v1/conversations/{cid}", timeout=30).json()
    assert stored["turns"] == 3
