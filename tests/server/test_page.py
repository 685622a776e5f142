"""The web chat page (``/``) in real headless Chromium (Debian's, through Playwright), against a
real ``rolechat serve`` with the embedded model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers import rolechat_serve

sync_api = pytest.importorskip("playwright.sync_api")

from rolechat.store import Store  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "page-key"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A rolechat home whose store already holds a conversation with markup in the assistant
    turn, and an interrupted user message after it."""
    home = tmp_path_factory.mktemp("page-home")
    store = Store(home / "rolechat.db")
    cid = store.create(system="Be brief.", title="Seeded markup")
    uid = store.begin_turn(cid, "hi")
    store.complete_turn(cid, uid, XSS, 5, {})
    late = store.begin_turn(cid, "this one was cut off")
    store.interrupt_turn(late)
    store.close()
    return {"home": home, "cid": cid}


@pytest.fixture(scope="module")
def server(seeded: dict[str, Any]) -> Iterator[str]:
    with rolechat_serve(seeded["home"]) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    opened = context.new_page()
    opened.set_default_timeout(30_000)
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, errors


def load(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def api(base: str, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, f"{base}/v1{path}", timeout=60, **kwargs)
    response.raise_for_status()
    return response.json() if response.content else None


def test_chat_stream_list_and_prompt_view(server: str, page: Any, tmp_path: Path) -> None:
    load(page, server)
    model = api(server, "GET", "/models")["data"][0]["id"]
    assert page.text_content("#model") == model
    personas = [p["name"] for p in api(server, "GET", "/personas")["data"]]
    assert personas and page.locator("#persona option").count() == len(personas) + 1
    page.select_option("#persona", personas[0])
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#input", "Say hello to Ada.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .usage")
    assert page.text_content(".msg.user .content") == "Say hello to Ada."
    assert page.text_content(".msg.assistant .content").strip()
    usage = page.text_content(".usage") or ""
    assert "tokens" in usage and "tok/s" in usage and "TTFT" in usage and "cached" in usage
    assert page.is_enabled("#send") and page.input_value("#input") == ""
    assert page.is_hidden("#error")

    # The conversation was created with the picked persona and parameters, and is listed.
    listed = page.locator("#conversations li", has_text="Say hello to Ada.")
    listed.wait_for()
    assert "1 turn" in (listed.text_content() or "")
    cid = listed.get_attribute("data-id")
    conv = api(server, "GET", f"/conversations/{cid}")
    assert conv["persona"] == personas[0]
    assert conv["params"]["max_new_tokens"] == 24 and conv["params"]["temperature"] == 0

    # The prompt view: the exact prompt for the draft, and the window plan.
    page.fill("#input", "And to Grace?")
    page.click("#prompt-toggle")
    page.wait_for_function(
        "document.getElementById('prompt-text').textContent.includes('And to Grace?')")
    prompt = page.text_content("#prompt-text") or ""
    assert "<|im_start|>system" in prompt and "Say hello to Ada." in prompt
    expected = api(server, "POST", f"/conversations/{cid}/prompt",
                   json={"content": "And to Grace?"})
    assert prompt == expected["prompt"]
    plan = page.text_content("#plan") or ""
    assert "kept 1 turns" in plan and "dropped 0 turns" in plan and "/" in plan
    page.screenshot(path=str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_user_markup_is_text_and_shift_enter_is_newline(server: str, page: Any) -> None:
    load(page, server)
    page.fill("#max-tokens", "4")
    page.click("#input")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    assert page.locator(".msg.user").count() == 0
    page.fill("#input", XSS)
    page.click("#send")
    assert page.is_disabled("#send")  # disabled while the reply streams
    page.wait_for_selector(".msg.assistant .usage")
    assert page.text_content(".msg.user .content") == XSS
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("#conversations li", has_text="<script>").count() >= 1


def test_stored_assistant_markup_is_text_and_interrupted_is_marked(
        server: str, seeded: dict[str, Any], page: Any) -> None:
    load(page, server)
    page.click(f"#conversations li[data-id='{seeded['cid']}']")
    page.wait_for_selector(".msg.assistant")
    assert page.text_content(".msg.assistant .content") == XSS
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.text_content("#title") == "Seeded markup"
    cut = page.locator(".msg.user.interrupted")
    assert cut.count() == 1 and "this one was cut off" in (cut.text_content() or "")
    # Opening by URL works too.
    load(page, f"{server}/#c={seeded['cid']}")
    page.wait_for_selector(".msg.assistant")
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_delete_conversation(server: str, page: Any) -> None:
    cid = api(server, "POST", "/conversations", json={})["id"]
    api(server, "POST", f"/conversations/{cid}/prompt", json={"content": "x"})
    load(page, server)
    item = page.locator(f"#conversations li[data-id='{cid}']")
    item.wait_for()
    page.once("dialog", lambda dialog: dialog.accept())
    item.hover()
    item.locator("button.delete").click()
    item.wait_for(state="detached")
    listed = [c["id"] for c in api(server, "GET", "/conversations")["data"]]
    assert cid not in listed


def test_api_key_prompt(tmp_path: Path, browser: Any) -> None:
    with rolechat_serve(tmp_path / "keyed", "--api-key", KEY) as base:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(base)
        page.wait_for_selector("#api-key", state="visible")
        assert page.is_visible("#error")
        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")
        page.wait_for_selector("body[data-ready='1']")
        assert page.text_content("#model") == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert page.is_hidden("#key-box") and page.is_hidden("#error")
        assert page.evaluate("localStorage.getItem('rolechat.apiKey')") == KEY
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_hidden("#key-box")
        context.close()


def test_undo_and_retry_buttons(server: str, page: Any) -> None:
    cid = api(server, "POST", "/conversations",
              json={"params": {"temperature": 0.9, "max_new_tokens": 12}})["id"]
    for text in ("First question?", "Second question?"):
        api(server, "POST", f"/conversations/{cid}/messages", json={"content": text})
    load(page, f"{server}/#c={cid}")
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.assistant").count() == 2
    assert page.is_enabled("#undo") and page.is_enabled("#retry")

    # Retry: the last reply is generated again, in place, with its usage line.
    before = api(server, "GET", f"/conversations/{cid}")["messages"][-1]["content"]
    page.click("#retry")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .usage').length === 2 "
                           "&& !document.querySelector('.msg.streaming')")
    stored = api(server, "GET", f"/conversations/{cid}")
    assert stored["turns"] == 2
    assert page.locator(".msg.assistant").count() == 2
    last = page.locator(".msg.assistant .content").last.text_content()
    assert last == stored["messages"][-1]["content"]
    assert isinstance(before, str)

    # Undo: the last turn goes, on the page and in the store.
    page.click("#undo")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1")
    assert api(server, "GET", f"/conversations/{cid}")["turns"] == 1
    assert page.text_content(".msg.user .content") == "First question?"
    page.click("#undo")
    page.wait_for_function("document.querySelectorAll('.msg').length === 0")
    assert page.is_disabled("#undo") and page.is_disabled("#retry")
