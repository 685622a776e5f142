"""The web chat page (``/``) in real headless Chromium (Debian's, through Playwright), against a
real ``rolechat serve`` with the embedded model, at a desktop (1200x800) and a phone (390x844)
viewport. Screenshots are kept as test artifacts in ``$ROLECHAT_ARTIFACTS`` (default:
``test-artifacts/screenshots/`` at the repository root); ``readme-*.png`` there are the
README's pictures (``docs/img/``)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pages import DESKTOP, PHONE, api, blank_page, chromium, idle, load, needs_chromium
from rolechat.conversation import Conversation, Message
from rolechat.store import Store
from rolechat.toolcalls import ToolCall
from servers import rolechat_serve

ROOT = Path(__file__).resolve().parents[2]
KEY = "page-key"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
#: A turn's tool call and its result (a result with markup: shown as text).
TOOL_STEPS = (
    Message("assistant", "", (ToolCall("call_w1", "get_weather", '{"city": "Paris"}'),)),
    Message("tool", '{"temp": 21, "sky": "<b>clear</b>"}', tool_call_id="call_w1"))
# A reply with Markdown worth rendering, and Markdown-borne attacks that must stay inert.
MARKDOWN = """Here is **bold** text and a list:

- one
- two

```python
def greet(name):
    return f"hi {name}"
```

[click me](javascript:window.__xss=3), [hidden](&#106;avascript:window.__xss=6),
[JS](JAVASCRIPT:window.__xss=7) and [safe link](https://example.com/)

<script>window.__xss=1</script>
<img src=x onerror="window.__xss=2">

Inline <img src=y onerror="window.__xss=4"> and ![pic](javascript:window.__xss=5)
"""
CODE = 'def greet(name):\n    return f"hi {name}"'
# A conversation with memory (seeded): turns 1-2 are in the summary, turn 1 is pinned.
MEMORY_TURNS = [("My name is Ada and I live in Lisbon.", "Nice to meet you, Ada."),
                ("I like green tea.", "Green tea is a fine choice."),
                ("What is 2 + 2?", "4."),
                ("And 3 + 3?", "6.")]
SUMMARY = "The user is Ada. She likes <b>green</b> tea."
# A conversation whose next message slides the window: its max_new_tokens leaves a prompt
# budget of 99 tokens (of the 1024-token context), which its turns overflow; the reply stops at
# its first space, so the slide's summarization is most of the work (about 3 s).
LONG_TURNS = [(f"Tell me about planet number {i}.",
               f"Planet number {i} is a cold world far from its star.") for i in range(3)]
LONG_PARAMS = {"max_new_tokens": 925, "temperature": 0, "stop": [" "]}

pytestmark = needs_chromium


# ----- servers and browsers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A rolechat home whose store already holds a conversation with markup in the assistant
    turn and an interrupted user message after it, and one with a Markdown reply."""
    home = tmp_path_factory.mktemp("page-home")
    store = Store(home / "rolechat.db")
    cid = store.create(system="Be brief.", title="Seeded markup")
    uid = store.begin_turn(cid, "hi")
    store.complete_turn(cid, uid, XSS, 5, {})
    late = store.begin_turn(cid, "this one was cut off")
    store.interrupt_turn(late)
    markdown = store.create(title="Seeded Markdown")
    uid = store.begin_turn(markdown, "Show me some Markdown.")
    store.complete_turn(markdown, uid, MARKDOWN, 60, {})
    memory = store.import_conversation(Conversation.from_tuples(MEMORY_TURNS, system="Be brief."),
                                       title="Seeded memory")
    store.update(memory, memory={"mode": "summary", "summary": SUMMARY, "covers": 2, "pins": [0]})
    sliding = store.import_conversation(Conversation.from_tuples(LONG_TURNS), title="Seeded long",
                                        params=LONG_PARAMS)
    store.update(sliding, memory={"mode": "summary", "summary": None, "covers": 0, "pins": []})
    tools = store.create(title="Seeded tools")
    uid = store.begin_turn(tools, "Weather in Paris?")
    store.complete_turn(tools, uid, "It is 21 degrees in Paris.", 9, {}, steps=TOOL_STEPS)
    store.close()
    return {"home": home, "cid": cid, "markdown": markdown, "memory": memory, "sliding": sliding,
            "tools": tools}


@pytest.fixture(scope="module")
def server(seeded: dict[str, Any]) -> Iterator[str]:
    with rolechat_serve(seeded["home"]) as base:
        yield base


SHOWCASE = [
    ("A haiku about green tea", "Write a haiku about green tea.",
     "Steam curls from the cup,\nmorning light on jade water,\nthe kettle hums low."),
    ("What the sliding window keeps", "What does the sliding window keep?",
     "The system prompt always, then the newest **whole turns** that fit in "
     "`context − max_new_tokens`.\n\n1. Oldest turns go first.\n2. The prompt always ends "
     "with your message.\n3. After a slide it keeps about 75 % of the budget, so the cached "
     "prefix stays valid for several turns."),
    ("Reverse a list in Python", "How do I reverse a list in Python?",
     "Pick by whether you want a **new list** or to change it **in place**:\n\n"
     "- `numbers[::-1]` returns a reversed copy.\n"
     "- `reversed(numbers)` gives an iterator, without copying.\n"
     "- `numbers.reverse()` reverses in place and returns `None`.\n\n"
     "```python\nnumbers = [1, 2, 3, 4]\nbackwards = numbers[::-1]   # [4, 3, 2, 1]\n"
     "for n in reversed(numbers):  # no copy\n    print(n)\n"
     "numbers.reverse()            # in place\nassert numbers == backwards\n```\n\n"
     "Slice when you need a copy; `reverse()` when you don't."),
]


@pytest.fixture(scope="module")
def showcase(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server whose store holds only a few tidy conversations (for the screenshots, the
    phone and the dark theme); the newest is the Python one."""
    home = tmp_path_factory.mktemp("showcase-home")
    store = Store(home / "rolechat.db")
    ids = []
    for title, question, answer in SHOWCASE:
        cid = store.create(system="Be concise.", title=title, persona="concise")
        store.complete_turn(cid, store.begin_turn(cid, question), answer, 40, {})
        ids.append(cid)
    follow = store.begin_turn(ids[-1], "And for a string?")
    store.complete_turn(ids[-1], follow, "Strings are immutable, so slice: `'hello'[::-1]` "
                        "gives `'olleh'`.", 20, {})
    store.close()
    with rolechat_serve(home) as base:
        yield {"base": base, "ids": ids}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def shots() -> Path:
    """Where screenshots go: $ROLECHAT_ARTIFACTS, or test-artifacts/screenshots/."""
    folder = Path(os.environ.get("ROLECHAT_ARTIFACTS") or ROOT / "test-artifacts" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Opens pages in fresh browser contexts (desktop and light unless told); each must end
    without a JavaScript error."""
    contexts: list[Any] = []
    errors: list[str] = []

    def make(viewport: dict[str, int] = DESKTOP, color_scheme: str = "light") -> Any:
        opened = blank_page(browser, errors, viewport=viewport, color_scheme=color_scheme,
                            permissions=["clipboard-read", "clipboard-write"])
        contexts.append(opened.context)
        return opened

    yield make
    for context in contexts:
        context.close()
    assert not errors, errors


@pytest.fixture
def page(new_page: Callable[..., Any]) -> Any:
    return new_page()


def clipboard(page: Any) -> str:
    text: str = page.evaluate("navigator.clipboard.readText()")
    return text


def shot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), animations="disabled")
    assert path.stat().st_size > 5_000
    return path


def luminance(css_color: str) -> float:
    """0 (black) to 1 (white), from a computed ``rgb(...)``/``rgba(...)`` colour."""
    r, g, b = (int(float(v)) for v in css_color[css_color.index("(") + 1:-1].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


# ----- chatting --------------------------------------------------------------------------------

def test_chat_stream_list_and_prompt_view(server: str, page: Any, shots: Path) -> None:
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
    idle(page)
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
    # The streamed reply is the stored one (Copy gives the text as written).
    page.locator(".msg.assistant [data-testid=copy]").click()
    assert clipboard(page) == conv["messages"][1]["content"]

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
    shot(page, shots, "chat-desktop")

    # With the box empty it shows the prompt the next message gets, not an error.
    page.fill("#input", "")
    page.wait_for_function(
        "document.getElementById('plan').textContent.startsWith('next message')")
    following = api(server, "POST", f"/conversations/{cid}/prompt", json={})
    assert following["next_message"] is True
    assert page.text_content("#prompt-text") == following["prompt"]
    assert following["prompt"].endswith("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")
    assert "Say hello to Ada." in following["prompt"] and page.is_hidden("#error")


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
    idle(page)  # the list is refreshed once the reply is done
    assert page.locator("#conversations li", has_text="<script>").count() >= 1


def test_stored_assistant_markup_is_text_and_interrupted_is_marked(
        server: str, seeded: dict[str, Any], page: Any) -> None:
    load(page, server)
    page.click(f"#conversations li[data-id='{seeded['cid']}']")
    page.wait_for_selector(".msg.assistant")
    # Raw HTML in a reply is shown as the text it is.
    assert (page.text_content(".msg.assistant .content") or "").strip() == XSS
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.text_content("#title") == "Seeded markup"
    cut = page.locator(".msg.user.interrupted")
    assert cut.count() == 1 and "this one was cut off" in (cut.text_content() or "")
    assert "interrupted" in (cut.locator(".status").text_content() or "")
    # Opening by URL works too.
    fresh = page.context.new_page()
    load(fresh, f"{server}/#c={seeded['cid']}")
    fresh.wait_for_selector(".msg.assistant")
    assert fresh.evaluate("typeof window.__xss") == "undefined"


def test_markdown_reply_is_rendered_sanitized_and_copyable(
        server: str, seeded: dict[str, Any], page: Any, shots: Path) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    load(page, f"{server}/#c={seeded['markdown']}")
    content = page.locator(".msg.assistant .content")
    content.wait_for()
    assert content.locator("strong").text_content() == "bold"
    assert content.locator("ul > li").all_text_contents() == ["one", "two"]
    # The code block: highlighted, labelled, with its own copy button.
    code = content.locator(".code-block pre code")
    assert code.text_content() == CODE
    assert "language-python" in (code.get_attribute("class") or "")
    assert code.locator(".hljs-keyword").first.text_content() == "def"
    assert content.locator(".code-lang").text_content() == "python"
    content.locator("[data-testid=copy-code]").click()
    assert clipboard(page) == CODE
    assert content.locator("[data-testid=copy-code]").get_attribute("data-copied") == "1"
    # The message's own Copy gives the Markdown as written.
    page.locator(".msg.assistant [data-testid=copy]").click()
    assert clipboard(page) == MARKDOWN

    # Nothing in the reply ran, and nothing that could run is left in the DOM.
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.evaluate("document.querySelectorAll('[onerror], [onload], [onclick]').length") == 0
    assert page.locator("#messages script, #messages iframe").count() == 0
    links = page.evaluate("[...document.querySelectorAll('#messages a')].map(a => "
                          "[a.textContent, a.getAttribute('href'), a.target, a.rel])")
    assert [text for text, *_ in links] == ["click me", "hidden", "JS", "safe link"]
    for _text, href, target, rel in links:
        assert href is None or not href.strip().lower().startswith(("javascript", "&#")), href
        if href is not None:
            assert (target, rel) == ("_blank", "noopener noreferrer")
    assert links[-1][1] == "https://example.com/"
    sources = page.evaluate("[...document.querySelectorAll('#messages img')]"
                            ".map(i => i.getAttribute('src'))")
    assert all(src is None or "javascript" not in src.lower() for src in sources)
    text = content.text_content() or ""
    assert "<script>window.__xss=1</script>" in text and 'onerror="window.__xss=4"' in text
    # Nothing came from anywhere but this server (the libraries are vendored).
    assert requested and all(url.startswith(server) for url in requested), requested
    shot(page, shots, "markdown-desktop")


def test_stop_keeps_the_partial_reply_marked_interrupted(server: str, page: Any,
                                                         shots: Path) -> None:
    cid = api(server, "POST", "/conversations",
              json={"params": {"temperature": 0, "max_new_tokens": 400}})["id"]
    load(page, f"{server}/#c={cid}")
    question = "Write a very long story about a dragon."
    page.fill("#input", question)
    page.click("#send")
    page.wait_for_function("(document.querySelector('.msg.assistant.streaming .content')"
                           "?.textContent || '').trim().length > 0")
    page.click("#stop")
    idle(page)
    reply = page.locator(".msg.assistant.interrupted")
    partial = reply.locator(".content").text_content() or ""
    assert partial.strip()
    assert "interrupted" in (reply.locator(".status").text_content() or "")
    asked = page.locator(".msg.user.interrupted")
    assert asked.locator(".content").text_content() == question
    assert page.is_enabled("#send") and page.is_hidden("#stop") and page.is_hidden("#error")
    assert page.locator("[data-testid=retry], [data-testid=undo]").count() == 0

    # The server keeps the message and the reply so far (at least what the page got), both
    # marked interrupted.
    deadline = time.monotonic() + 30
    while True:
        stored = api(server, "GET", f"/conversations/{cid}")["messages"]
        if stored and stored[0]["status"] != "pending":
            break
        assert time.monotonic() < deadline, stored
        time.sleep(0.2)
    assert [(m["role"], m["status"]) for m in stored] == [("user", "interrupted"),
                                                          ("assistant", "interrupted")]
    assert stored[0]["content"] == question and same_start(stored[1]["content"], partial)

    # After a reload (or in another tab) both still show, marked interrupted.
    page.reload()
    page.wait_for_selector("body[data-ready='1']:not([data-busy])")
    assert page.locator(".msg.user.interrupted .content").text_content() == question
    kept = page.locator(".msg.assistant.interrupted")
    assert kept.count() == 1 and same_start(kept.locator(".content").text_content(), partial)
    assert "interrupted" in (kept.locator(".status").text_content() or "")
    shot(page, shots, "stopped-desktop")

    # Stopping a regenerated reply keeps the one it was to replace.
    first = api(server, "POST", f"/conversations/{cid}/messages",
                json={"content": "Tell me a long story about a cat.",
                      "params": {"max_new_tokens": 8}})["message"]["content"]
    page.reload()
    page.wait_for_selector("body[data-ready='1']:not([data-busy])")
    page.click("[data-testid=retry]")
    page.wait_for_function("(document.querySelector('.msg.assistant.streaming .content')"
                           "?.textContent || '').trim().length > 0")
    page.click("#stop")
    idle(page)
    assert "previous reply is kept" in (page.text_content("#error") or "")
    stored = api(server, "GET", f"/conversations/{cid}")
    assert stored["turns"] == 1 and stored["messages"][-1]["content"] == first
    assert all(m["status"] != "pending" for m in stored["messages"])
    page.locator(".msg.assistant:not(.interrupted)").last.locator("[data-testid=copy]").click()
    assert clipboard(page) == first
    assert same_start(page.locator(".msg.assistant.interrupted .content").first.text_content(),
                      partial)


def same_start(text: str | None, partial: str) -> bool:
    """Whether ``text`` begins as ``partial`` does, letters and digits only (one may be the
    rendered Markdown of the other, and the server may have generated a little more)."""
    def letters(value: str | None) -> str:
        return re.sub(r"\W", "", value or "")
    return bool(letters(partial)) and letters(text).startswith(letters(partial)[:12])


def test_regenerate_edit_undo_and_copy(server: str, page: Any) -> None:
    cid = api(server, "POST", "/conversations",
              json={"params": {"temperature": 0.9, "max_new_tokens": 12}})["id"]
    for text in ("First question?", "Second question?"):
        api(server, "POST", f"/conversations/{cid}/messages", json={"content": text})
    load(page, f"{server}/#c={cid}")
    assert page.locator(".msg.assistant").count() == 2
    # The last turn's actions sit on its reply, Edit on every message sent; every message can
    # be copied.
    last_reply, last_user = page.locator(".msg.assistant").last, page.locator(".msg.user").last
    assert last_reply.locator("[data-testid=retry]").is_enabled()
    assert last_reply.locator("[data-testid=undo]").is_enabled()
    assert last_user.locator("[data-testid=edit]").count() == 1
    assert page.locator("[data-testid=retry], [data-testid=undo]").count() == 2
    assert page.locator(".msg.user [data-testid=edit]").count() == 2
    assert page.locator("[data-testid=copy]").count() == 4
    page.locator(".msg.user").first.locator("[data-testid=copy]").click()
    assert clipboard(page) == "First question?"

    # Regenerate: the last reply is generated again, in place, with its usage line; the old one
    # stays a version (1/2), one click away.
    old_reply = api(server, "GET", f"/conversations/{cid}")["messages"][-1]
    page.click("[data-testid=retry]")
    idle(page)
    stored = api(server, "GET", f"/conversations/{cid}")
    assert stored["turns"] == 2
    assert page.locator(".msg.assistant").count() == 2
    assert page.locator(".msg.assistant .usage").count() == 2
    page.locator(".msg.assistant").last.locator("[data-testid=copy]").click()
    assert clipboard(page) == stored["messages"][-1]["content"]
    assert page.locator(".msg.user").last.locator(".version-of").inner_text() == "2/2"
    page.locator(".msg.user").last.locator("[data-testid=version-prev]").click()
    idle(page)
    stored_reply = api(server, "GET", f"/conversations/{cid}")["messages"][-1]
    assert stored_reply["id"] == old_reply["id"]
    assert page.locator(".msg.user").last.locator(".version-of").inner_text() == "1/2"
    page.locator(".msg.user").last.locator("[data-testid=version-next]").click()
    idle(page)
    newest = api(server, "GET", f"/conversations/{cid}")["messages"][-1]
    assert newest["id"] == stored["messages"][-1]["id"]

    # Edit: the last message goes back into the box; Escape (or Cancel) leaves it be.
    page.locator(".msg.user").last.locator("[data-testid=edit]").click()
    assert page.input_value("#input") == "Second question?" and page.is_visible("#edit-banner")
    page.press("#input", "Escape")
    assert page.input_value("#input") == "" and page.is_hidden("#edit-banner")
    # Edit and resend: the last turn is replaced by the edited one.
    page.locator(".msg.user").last.locator("[data-testid=edit]").click()
    page.fill("#input", "Second question, edited?")
    page.press("#input", "Enter")
    idle(page)
    stored = api(server, "GET", f"/conversations/{cid}")
    assert stored["turns"] == 2
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
        "First question?", "Second question, edited?"]
    assert page.locator(".msg.user .content").all_text_contents() == [
        "First question?", "Second question, edited?"]
    assert page.is_hidden("#edit-banner") and page.input_value("#input") == ""

    # Undo: the last turn goes, on the page and in the store.
    page.click("[data-testid=undo]")
    idle(page)
    assert api(server, "GET", f"/conversations/{cid}")["turns"] == 1
    assert page.locator(".msg.user .content").all_text_contents() == ["First question?"]
    page.click("[data-testid=undo]")
    idle(page)
    assert page.locator(".msg").count() == 0
    assert page.locator("[data-testid=retry], [data-testid=undo]").count() == 0
    assert api(server, "GET", f"/conversations/{cid}")["turns"] == 0


def test_a_stale_tab_refreshes_instead_of_undoing_what_it_did_not_show(
        server: str, new_page: Callable[..., Any]) -> None:
    """Two tabs on one conversation: the second adds a turn; Undo, Regenerate and Edit in the
    first (which never showed that turn: its event stream is cut, as on a flaky network)
    refuse, refresh it with a note, and delete nothing."""
    cid = api(server, "POST", "/conversations",
              json={"params": {"temperature": 0, "max_new_tokens": 6}})["id"]
    api(server, "POST", f"/conversations/{cid}/messages", json={"content": "First question?"})
    stale, other = new_page(), new_page()
    stale.route("**/events", lambda route: route.abort())
    for tab in (stale, other):
        load(tab, f"{server}/#c={cid}")
    other.fill("#input", "Second question?")
    other.press("#input", "Enter")
    idle(other)
    stored = api(server, "GET", f"/conversations/{cid}")
    assert stored["turns"] == 2
    # The stale tab shows one turn; each action on it is refused and the tab shows both.
    for action in ("undo", "retry", "edit"):
        assert stale.locator(".msg.assistant").count() == 1, action
        if action == "edit":
            stale.click("[data-testid=edit]")
            stale.fill("#input", "First question, edited?")
            stale.press("#input", "Enter")
        else:
            stale.click(f"[data-testid={action}]")
        idle(stale)
        note = stale.text_content("[data-testid=notice]") or ""
        assert stale.is_visible("[data-testid=notice]") and "another tab or window" in note
        assert stale.is_hidden("#error"), stale.text_content("#error")
        assert api(server, "GET", f"/conversations/{cid}")["messages"] == stored["messages"]
        assert stale.locator(".msg.user .content").all_text_contents() == [
            "First question?", "Second question?"]
        if action == "edit":  # the edited text is not lost
            assert stale.input_value("#input") == "First question, edited?"
            assert stale.is_hidden("#edit-banner")
            break
        # It shows the second turn now, so it may undo it; then the other tab sends again, and
        # this tab is stale once more for the next action.
        stale.click("[data-testid=undo]")
        idle(stale)
        assert api(server, "GET", f"/conversations/{cid}")["turns"] == 1
        assert "another tab" not in (stale.text_content("[data-testid=notice]") or "")
        assert stale.input_value("#input") == "Second question?"  # back in the box
        stale.fill("#input", "")
        other.reload()
        other.wait_for_selector("body[data-ready='1']:not([data-busy])")
        other.fill("#input", "Second question?")
        other.press("#input", "Enter")
        idle(other)
        stored = api(server, "GET", f"/conversations/{cid}")
        assert stored["turns"] == 2


# ----- per conversation ------------------------------------------------------------------------

def page_export(page: Any, item: str) -> tuple[str, str]:
    """Export the open conversation from its menu: (file name, text)."""
    page.click("[data-testid=menu]")
    with page.expect_download() as downloading:
        page.click(f"[data-testid={item}]")
    download = downloading.value
    return download.suggested_filename, Path(download.path()).read_text(encoding="utf-8")


def cli_export(seeded: dict[str, Any], cid: int, fmt: str) -> str:
    """What `rolechat conversations export` writes for ``cid`` (from the server's store)."""
    store = Store(seeded["home"] / "rolechat.db", read_only=True)
    try:
        return store.export(cid, fmt)
    finally:
        store.close()


def test_rename_system_prompt_and_export(server: str, seeded: dict[str, Any], page: Any,
                                         tmp_path: Path) -> None:
    cid = api(server, "POST", "/conversations",
              json={"system": "Be brief.", "params": {"temperature": 0, "max_new_tokens": 6}})["id"]
    api(server, "POST", f"/conversations/{cid}/messages", json={"content": "Name a colour."})
    load(page, f"{server}/#c={cid}")

    # Rename, from the conversation's menu.
    page.click("[data-testid=menu]")
    page.click("[data-testid=rename]")
    page.fill("#title-input", "Colours")
    page.press("#title-input", "Enter")
    idle(page)
    assert page.text_content("#title") == "Colours"
    assert api(server, "GET", f"/conversations/{cid}")["title"] == "Colours"
    assert page.locator(f"#conversations li[data-id='{cid}'] .conv-title").text_content() == (
        "Colours")

    # The system prompt editor: it shows the current one; the next prompt uses the new one.
    page.click("#system-toggle")
    assert page.input_value("#system-input") == "Be brief."
    page.fill("#system-input", "You are a cat. Say meow.")
    page.click("#system-save")
    idle(page)
    assert page.is_hidden("#system-panel")
    assert api(server, "GET", f"/conversations/{cid}")["system"] == "You are a cat. Say meow."
    page.click("#prompt-toggle")
    page.wait_for_function(
        "document.getElementById('prompt-text').textContent.includes('Say meow.')")
    prompt = page.text_content("#prompt-text") or ""
    assert "Be brief." not in prompt and "Name a colour." in prompt
    assert prompt == api(server, "POST", f"/conversations/{cid}/prompt", json={})["prompt"]

    # Export: files made in the page, in the shapes `rolechat conversations export` writes.
    stored = api(server, "GET", f"/conversations/{cid}")
    turns = [(stored["messages"][0]["content"], stored["messages"][1]["content"])]
    expected = Conversation.from_tuples(turns, system="You are a cat. Say meow.")
    for item, suffix in (("export-md", ".md"), ("export-json", ".json")):
        name, text = page_export(page, item)
        assert name == f"rolechat-{cid}-colours{suffix}"
        if suffix == ".md":
            assert text == expected.to_markdown("Colours") == cli_export(seeded, cid, "md")
        else:
            data = json.loads(text)
            assert data == json.loads(cli_export(seeded, cid, "json"))
            assert {k: v for k, v in data.items() if k not in ("system", "messages")} == {
                "id": cid, "title": "Colours", "persona": stored["persona"],
                "model": stored["model"], "params": stored["params"],
                "memory": stored["memory"], "created_at": stored["created_at"]}
            assert Conversation.from_dict(data).to_dict() == expected.to_dict()
            imported = Store(tmp_path / "imported.db")  # it can be imported again
            try:
                again = imported.import_file(text)
                assert imported.conversation(again).to_dict() == expected.to_dict()
                assert imported.info(again).title == "Colours"
            finally:
                imported.close()

    # An empty system prompt means none.
    page.click("#system-toggle")
    page.fill("#system-input", "")
    page.click("#system-save")
    idle(page)
    assert api(server, "GET", f"/conversations/{cid}")["system"] is None
    page.wait_for_function(
        "!document.getElementById('prompt-text').textContent.includes('Say meow.')")


def test_export_keeps_interrupted_messages_as_the_cli_does(server: str, seeded: dict[str, Any],
                                                           page: Any) -> None:
    """The seeded conversation ends with a message whose reply was cut off: the page's exports
    keep it, marked, exactly as `rolechat conversations export` does."""
    cid = seeded["cid"]
    load(page, f"{server}/#c={cid}")
    _, text = page_export(page, "export-md")
    assert text == cli_export(seeded, cid, "md")
    assert "### You (interrupted: not answered)\n\nthis one was cut off" in text
    _, text = page_export(page, "export-json")
    data = json.loads(text)
    assert data == json.loads(cli_export(seeded, cid, "json"))
    assert data["messages"][-1] == {"role": "user", "content": "this one was cut off",
                                    "status": "interrupted"}


def test_stored_tool_calls_are_collapsible_cards(server: str, seeded: dict[str, Any],
                                                 page: Any, shots: Path) -> None:
    cid = seeded["tools"]
    load(page, f"{server}/#c={cid}")
    card = page.locator("[data-testid=tool-call]")
    assert card.count() == 1
    assert card.locator(".tool-name").inner_text() + card.locator(".tool-args").inner_text() \
        == 'get_weather({"city": "Paris"})'
    result = card.locator("[data-testid=tool-result]")
    assert not result.is_visible()  # collapsed until opened
    card.locator("summary").click()
    assert result.is_visible() and result.inner_text() == '{"temp": 21, "sky": "<b>clear</b>"}'
    assert card.locator("b").count() == 0  # the result's markup is text
    # The card stands before the reply it led to.
    order = page.eval_on_selector_all("#messages > *", "nodes => nodes.map(n => n.dataset.testid)")
    assert order.index("tool-call") < order.index("msg-assistant")
    shot(page, shots, "tool-calls")
    _, text = page_export(page, "export-md")
    assert text == cli_export(seeded, cid, "md")
    _, text = page_export(page, "export-json")
    assert json.loads(text) == json.loads(cli_export(seeded, cid, "json"))


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


# ----- memory: the summary, pinned turns, the memory mode ---------------------------------------

def test_memory_plan_pins_and_mode(server: str, seeded: dict[str, Any], page: Any,
                                   shots: Path) -> None:
    cid = seeded["memory"]
    load(page, f"{server}/#c={cid}")
    replies = page.locator(".msg.assistant")
    assert replies.count() == len(MEMORY_TURNS)
    # The stored pin shows: turn 1 is marked (both its messages), its reply offers Unpin.
    assert page.locator("[data-testid=pin-badge]").count() == 1
    assert replies.first.locator("[data-testid=pin-badge]").text_content() == "pinned"
    assert page.locator(".msg.pinned").count() == 2
    assert "pinned" in (page.locator(".msg.user").first.get_attribute("class") or "")
    assert page.locator("[data-testid=pin]").all_text_contents() == ["Unpin", "Pin", "Pin", "Pin"]

    # The plan: what is kept, pinned and dropped, and the summary the prompt carries (as text).
    page.click("#prompt-toggle")
    page.locator("[data-testid=plan-summary]").wait_for()
    plan = api(server, "POST", f"/conversations/{cid}/prompt", json={})["plan"]
    assert (plan["kept_turns"], plan["dropped_turns"], plan["pinned_turns"]) == ([0, 2, 3], [1],
                                                                                 [0])
    assert plan["memory"]["summary"] == SUMMARY and plan["memory"]["summarized_turns"] == [1]
    assert page.text_content("[data-testid=plan-turns]") == (
        "kept: turns 1, 3, 4 · dropped: turn 2 · pinned: turn 1 · "
        "memory: summary of dropped turns")
    assert page.text_content("[data-testid=plan-summary] .plan-label") == "Summary of turn 2"
    assert page.text_content("[data-testid=plan-summary] .plan-summary-text") == SUMMARY
    assert page.locator("#plan b, #messages b").count() == 0
    prompt = page.text_content("#prompt-text") or ""
    assert f"[Summary of the earlier conversation]\n{SUMMARY}" in prompt
    assert MEMORY_TURNS[0][0] in prompt and MEMORY_TURNS[1][0] not in prompt
    page.evaluate("document.getElementById('messages').scrollTop = 0")
    shot(page, shots, "memory-desktop")

    # Unpin turn 1: the store forgets the pin, the badge goes, the plan drops the turn.
    replies.first.locator("[data-testid=pin]").click()
    idle(page)
    assert api(server, "GET", f"/conversations/{cid}")["memory"]["pins"] == []
    assert page.locator("[data-testid=pin-badge], .msg.pinned").count() == 0
    assert page.locator("[data-testid=pin]").all_text_contents() == ["Pin"] * 4
    assert "dropped: turns 1, 2" in (page.text_content("[data-testid=plan-turns]") or "")
    assert "pinned" not in (page.text_content("[data-testid=plan-turns]") or "")
    # Turn 1 was pinned when the summary was made, so it is not in it; the next slide folds
    # it in.
    assert page.text_content("[data-testid=plan-summary] .plan-label") == "Summary of turn 2"
    assert MEMORY_TURNS[0][0] not in (page.text_content("#prompt-text") or "")

    # Pin turn 3 instead (PATCH with the whole new list); a reload still shows it.
    replies.nth(2).locator("[data-testid=pin]").click()
    idle(page)
    assert api(server, "GET", f"/conversations/{cid}")["memory"]["pins"] == [2]
    assert replies.nth(2).locator("[data-testid=pin-badge]").count() == 1
    assert "pinned: turn 3" in (page.text_content("[data-testid=plan-turns]") or "")
    page.reload()
    page.wait_for_selector("body[data-ready='1']:not([data-busy])")
    assert page.locator(".msg.assistant").nth(2).locator("[data-testid=pin-badge]").count() == 1
    assert page.locator("[data-testid=pin]").all_text_contents() == ["Pin", "Pin", "Unpin", "Pin"]

    # The memory switch in the ⋯ menu shows the mode and changes it.
    toggle = page.locator("[data-testid=memory-toggle]")
    page.click("[data-testid=menu]")
    assert toggle.text_content() == "Summarize dropped turns: on"
    assert toggle.get_attribute("aria-checked") == "true"
    toggle.click()
    idle(page)
    assert api(server, "GET", f"/conversations/{cid}")["memory"]["mode"] == "none"
    assert toggle.text_content() == "Summarize dropped turns: off"
    page.click("[data-testid=menu]")
    toggle.click()
    idle(page)
    assert api(server, "GET", f"/conversations/{cid}")["memory"]["mode"] == "summary"
    assert toggle.get_attribute("aria-checked") == "true"
    assert page.is_hidden("#error")


def test_memory_for_a_new_conversation_and_a_slide_note(server: str, seeded: dict[str, Any],
                                                        page: Any, shots: Path) -> None:
    # "Remember dropped turns" creates the conversation with summary memory.
    load(page, server)
    page.check("[data-testid=memory-new]")
    page.fill("#max-tokens", "2")
    page.fill("#input", "Remember that my cat is called Tom.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .usage")
    idle(page)
    cid = page.evaluate("decodeURIComponent(location.hash.slice(3))")
    conv = api(server, "GET", f"/conversations/{cid}")
    assert conv["memory"]["mode"] == "summary" and "memory" not in conv["params"]
    page.click("[data-testid=menu]")
    assert page.text_content("[data-testid=memory-toggle]") == "Summarize dropped turns: on"
    page.keyboard.press("Escape")

    # A conversation past its window: the dry run says what the next message folds into the
    # summary; the reply that slides says what the summary cost, here and after a reload.
    cid = seeded["sliding"]
    page.goto("about:blank")  # a new hash alone would not load the page again
    load(page, f"{server}/#c={cid}")
    page.click("#prompt-toggle")
    fold = page.locator("[data-testid=plan-fold]")
    fold.wait_for()
    plan = api(server, "POST", f"/conversations/{cid}/prompt", json={})["plan"]
    folding = plan["memory"]["summarize_turns"]
    assert folding and folding[0] == 0
    assert "will be folded into the summary" in (fold.text_content() or "")
    page.fill("#input", "Which planet was first?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .usage")
    idle(page)
    stored = api(server, "GET", f"/conversations/{cid}")
    reply = page.locator(".msg.assistant").last
    line = reply.locator("[data-testid=memory-usage]")
    assert line.count() == 1
    text = line.text_content() or ""
    note = stored["messages"][-1]["usage"]["window"]["memory_note"]
    if stored["memory"]["summary"]:  # the model summarized: the summary covers those turns
        covers = stored["memory"]["covers"]
        assert covers >= len(folding) and text.startswith(
            f"window slid: {covers} turns summarized in ")
        page.locator("[data-testid=plan-summary]").wait_for()
        assert stored["memory"]["summary"] in (page.text_content("#plan") or "")
    else:  # it said nothing: the turns were dropped plainly, and the page says why
        assert text.startswith("window slid: summarizing took") and note
    if note:
        assert note in (reply.locator("[data-testid=memory-note]").text_content() or "")
    page.reload()
    page.wait_for_selector("body[data-ready='1']:not([data-busy])")
    reloaded = page.locator(".msg.assistant").last.locator("[data-testid=memory-usage]")
    assert reloaded.text_content() == text
    assert page.is_hidden("#error")
    shot(page, shots, "memory-slide-desktop")


# ----- a busy server: the reply waits in the queue ------------------------------------------------

STORY = "Write a very long story about a dragon."  # 400 tokens at temperature 0 (no stop)
# Every text the waiting lines among the messages take, in order (a reply's line may change
# and go within one read of the stream, between two polls of a test).
RECORD_WAITING = """() => {
  window.__waiting = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.dataset && r.target.dataset.testid === "waiting") {
        for (const n of r.addedNodes) window.__waiting.push(n.textContent);
      }
    }
  }).observe(document.getElementById("messages"), { childList: true, subtree: true });
}"""
# The live regions among the messages and around them (the page's own #error and #notice
# are elsewhere).
LIVE_REGIONS = """() => {
  const live = "[aria-live], [role=status], [role=alert], [role=log], [role=marquee]";
  const found = [...document.getElementById("messages").querySelectorAll(live)];
  for (let n = document.getElementById("messages"); n; n = n.parentElement) {
    if (n.matches(live)) found.push(n);
  }
  return found.map((n) => [n.dataset.testid || n.id, n.getAttribute("role"),
                           n.getAttribute("aria-live")]);
}"""


class Occupier:
    """A streaming ``/v1/chat/completions`` request for a 400-token story, read in a thread: it
    holds the server's one sequence, or waits in its queue, until it ends or is stopped."""

    def __init__(self, base: str) -> None:
        self.started = threading.Event()  # its first text came: it holds the sequence
        self.queued = threading.Event()   # the server said it waits (an SSE comment)
        self.stop = threading.Event()
        self.waiting: list[str] = []
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, args=(base,), daemon=True)
        self.thread.start()

    def _read(self, base: str) -> None:
        body = {"messages": [{"role": "user", "content": STORY}], "max_tokens": 400,
                "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                              timeout=120) as response:
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return  # closing the stream stops its generation
                    if line.startswith(": waiting"):
                        self.waiting.append(line)
                        self.queued.set()
                    elif line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        if choice["delta"].get("content"):
                            self.started.set()
                        self.finish = choice.get("finish_reason") or self.finish
        except Exception as exc:  # handed to the test
            self.error = exc

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive() and self.error is None, self.error


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of two computed ``rgb(...)`` colours."""
    def relative(css_color: str) -> float:
        channels = [int(float(v)) / 255
                    for v in css_color[css_color.index("(") + 1:-1].split(",")[:3]]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
                   for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    light, dark = sorted((relative(fg), relative(bg)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_a_queued_reply_says_how_many_are_ahead(tmp_path: Path, new_page: Callable[..., Any],
                                                shots: Path) -> None:
    """With the server's one sequence busy (``--parallel 1``), a message sent from the page
    waits: its reply says "waiting (1 ahead)", then "waiting (next)", in a polite status line
    (the only live region among the messages, so the streamed text is never read out), then
    shows its text, and the line is gone. Stop while waiting takes the line away too."""
    with rolechat_serve(tmp_path / "queued", "--parallel", "1") as base:
        page = new_page()
        load(page, base)
        page.evaluate(RECORD_WAITING)
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        # One story holds the sequence; a second waits behind it, next in the queue.
        first = Occupier(base)
        assert first.started.wait(60)
        second = Occupier(base)
        assert second.queued.wait(30) and second.waiting == [": waiting, 0 ahead"]
        page.fill("#input", "Say hello.")
        page.press("#input", "Enter")

        line = page.locator(".msg.assistant [data-testid=waiting]")
        page.wait_for_function("document.querySelector('[data-testid=waiting]')"
                               "?.textContent === 'waiting (1 ahead)'")
        reply = page.locator(".msg.assistant")
        assert (reply.locator(".content").text_content() or "") == ""
        assert line.get_attribute("role") == "status"
        assert line.get_attribute("aria-live") == "polite"
        assert page.evaluate(LIVE_REGIONS) == [["waiting", "status", "polite"]]
        # No blinking cursor beside it: the line says what the reply waits for.
        assert page.evaluate("getComputedStyle(document.querySelector('.msg.assistant "
                             ".content'), '::after').content") == "none"

        def readable() -> None:
            colour = line.evaluate("n => getComputedStyle(n).color")
            background = reply.evaluate("n => getComputedStyle(n).backgroundColor")
            assert contrast(colour, background) >= 4.5, (colour, background)
            box, bubble = line.bounding_box(), reply.bounding_box()
            assert box and bubble and box["height"] > 0
            assert bubble["x"] <= box["x"] and box["x"] + box["width"] <= bubble["x"] + \
                bubble["width"] + 0.5
            assert page.evaluate("document.documentElement.scrollWidth") <= \
                page.viewport_size["width"]

        readable()
        shot(page, shots, "waiting-desktop")

        # The first story ends; the second takes the sequence, and this reply is next.
        page.wait_for_function("document.querySelector('[data-testid=waiting]')"
                               "?.textContent === 'waiting (next)'")
        page.emulate_media(color_scheme="dark")
        assert luminance(reply.evaluate("n => getComputedStyle(n).backgroundColor")) < 0.2
        readable()
        shot(page, shots, "waiting-dark-desktop")
        page.set_viewport_size(PHONE)
        page.emulate_media(color_scheme="light")
        readable()
        shot(page, shots, "waiting-phone")
        assert line.text_content() == "waiting (next)"  # all of this while it still waited

        # Then its text comes, and the line is gone.
        page.wait_for_selector(".msg.assistant .usage", timeout=60_000)
        idle(page)
        assert (reply.locator(".content").text_content() or "").strip()
        assert page.locator("[data-testid=waiting]").count() == 0
        assert page.evaluate("window.__waiting") == ["waiting (1 ahead)", "waiting (next)"]
        assert page.is_hidden("#error")
        first.end()
        second.end()
        assert first.finish == second.finish == "length"  # each held the sequence throughout

        # Stopped while it waits: the line goes with it, and nothing was generated.
        third = Occupier(base)
        assert third.started.wait(60)
        page.fill("#input", "And goodbye.")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('[data-testid=waiting]')"
                               "?.textContent === 'waiting (next)'")
        page.click("#stop")
        idle(page)
        assert page.locator("[data-testid=waiting]").count() == 0
        assert page.locator(".msg.user.interrupted .content").text_content() == "And goodbye."
        assert page.is_hidden("#stop") and page.is_enabled("#send")
        third.end()


# ----- themes, phones, the icon, the key ---------------------------------------------------------

def test_readme_screenshot_and_light_theme(showcase: dict[str, Any], page: Any,
                                           shots: Path) -> None:
    load(page, f"{showcase['base']}/#c={showcase['ids'][-1]}")
    page.locator(".code-block").wait_for()
    assert page.is_hidden("#sidebar-toggle")  # the sidebar is always there on a desktop
    assert luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) > 0.9
    page.locator("#input").blur()
    page.evaluate("document.getElementById('messages').scrollTop = 0")
    path = shot(page, shots, "readme-page")
    assert path.stat().st_size < 200_000


def test_readme_screenshots_of_settings_search_and_branches(showcase: dict[str, Any], page: Any,
                                                   shots: Path) -> None:
    """``readme-settings.png``, ``readme-search.png`` and ``readme-branches.png`` are the
    README's other pictures (``docs/img/``): the Settings panel with the parameters' sources,
    Ctrl+K's hits, and a message with two versions (the first one shown again)."""
    load(page, f"{showcase['base']}/#c={showcase['ids'][-1]}")
    page.locator(".code-block").wait_for()
    page.click("#system-toggle")
    page.wait_for_selector("#params-box:not([hidden])")
    idle(page)
    assert page.input_value("#system-input") == "Be concise."
    assert page.inner_text("[data-testid=param-source-temperature]") == "rolechat's default"
    page.locator("#input").blur()
    assert shot(page, shots, "readme-settings").stat().st_size < 250_000
    page.click("#system-toggle")
    page.keyboard.press("Control+k")
    page.keyboard.type("reverse")
    page.wait_for_selector("[data-testid=search-results] [role=option]")
    hits = page.locator("[data-testid=search-results] [role=option]")
    assert "Reverse a list in Python" in hits.first.inner_text()
    assert shot(page, shots, "readme-search").stat().st_size < 250_000
    page.keyboard.press("Escape")

    # readme-branches.png: the follow-up asked another way; the first version stays (1/2).
    cid = showcase["ids"][-1]
    follow_up = api(showcase["base"], "GET", f"/conversations/{cid}")["messages"][-2]
    api(showcase["base"], "POST", f"/conversations/{cid}/messages",
        json={"content": "And for a tuple?", "edit": follow_up["id"],
              "params": {"max_new_tokens": 24, "temperature": 0}})
    try:
        load(page, f"{showcase['base']}/#c={cid}")
        versions = page.locator(".msg.user").last.locator(".version-of")
        assert versions.inner_text() == "2/2"
        page.locator(".msg.user").last.locator("[data-testid=version-prev]").click()
        idle(page)
        page.wait_for_function("[...document.querySelectorAll('.msg.user .content')].pop()"
                               ".innerText === 'And for a string?'")
        assert versions.inner_text() == "1/2"
        page.locator("#input").blur()
        assert shot(page, shots, "readme-branches").stat().st_size < 250_000
    finally:  # the other tests find the showcase as it was
        shown = api(showcase["base"], "GET", f"/conversations/{cid}")["messages"][-2]
        if shown["content"] != "And for a string?":
            api(showcase["base"], "POST", f"/conversations/{cid}/branch",
                json={"branch": shown["versions"]["branches"][0]})


def test_dark_theme_follows_the_system(showcase: dict[str, Any],
                                       new_page: Callable[..., Any], shots: Path) -> None:
    page = new_page(color_scheme="dark")
    load(page, f"{showcase['base']}/#c={showcase['ids'][-1]}")
    page.locator(".code-block").wait_for()

    def colour(selector: str, prop: str) -> float:
        return luminance(page.eval_on_selector(
            selector, f"n => getComputedStyle(n).{prop}"))

    assert colour("body", "backgroundColor") < 0.15
    assert colour("body", "color") > 0.8
    assert colour(".msg.assistant", "backgroundColor") < 0.2
    assert colour(".code-block pre code", "backgroundColor") < 0.15  # the dark code theme
    assert colour("#input", "backgroundColor") < 0.2
    shot(page, shots, "dark-desktop")
    phone = new_page(viewport=PHONE, color_scheme="dark")
    load(phone, f"{showcase['base']}/#c={showcase['ids'][-1]}")
    assert colour("body", "backgroundColor") < 0.15
    shot(phone, shots, "dark-phone")


def test_phone_sidebar_opens_switches_and_starts_new(showcase: dict[str, Any],
                                                     new_page: Callable[..., Any],
                                                     shots: Path) -> None:
    page = new_page(viewport=PHONE)
    newest, older = showcase["ids"][-1], showcase["ids"][0]
    load(page, f"{showcase['base']}/#c={newest}")
    assert page.is_hidden("#sidebar") and page.is_visible("#sidebar-toggle")
    assert page.text_content("#title") == SHOWCASE[-1][0]
    shot(page, shots, "chat-phone")

    page.click("#sidebar-toggle")
    page.wait_for_selector("#sidebar", state="visible")
    assert page.get_attribute("#sidebar-toggle", "aria-expanded") == "true"
    assert page.locator("#conversations li").count() == len(SHOWCASE)
    shot(page, shots, "sidebar-phone")
    # Switch conversations: the drawer closes on the one picked.
    page.click(f"#conversations li[data-id='{older}']")
    page.wait_for_selector("#sidebar", state="hidden")
    idle(page)
    assert page.text_content("#title") == SHOWCASE[0][0]
    assert "jade water" in (page.text_content(".msg.assistant .content") or "")
    # The backdrop closes it too.
    page.click("#sidebar-toggle")
    page.wait_for_selector("#sidebar", state="visible")
    page.click("#backdrop", position={"x": 370, "y": 400})
    page.wait_for_selector("#sidebar", state="hidden")
    # A new conversation, from the drawer.
    page.click("#sidebar-toggle")
    page.wait_for_selector("#sidebar", state="visible")
    page.click("#new")
    page.wait_for_selector("#sidebar", state="hidden")
    assert page.text_content("#title") == "New conversation"
    assert page.locator(".msg").count() == 0 and page.is_visible(".empty")
    assert page.evaluate("location.hash") == ""
    # Every control fits the screen: nothing scrolls sideways.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_favicon_and_assets_are_served(server: str) -> None:
    icon = httpx.get(f"{server}/favicon.ico", timeout=10)
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/")
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
    svg = httpx.get(f"{server}/favicon.svg", timeout=10)
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    page = httpx.get(server, timeout=10).text
    assert '<link rel="icon" href="favicon.svg"' in page
    assert "http://" not in page and "https://" not in page  # no CDN
    for asset in ("vendor/marked/marked.umd.js", "vendor/dompurify/purify.min.js",
                  "vendor/highlight/highlight.min.js", "vendor/highlight/github.min.css",
                  "vendor/highlight/github-dark.min.css", "app.js", "style.css"):
        assert f'"{asset}"' in page, asset
    for asset in ("vendor/marked/marked.umd.js", "app.js", "api.js", "markdown.js"):
        served = httpx.get(f"{server}/{asset}", timeout=10)
        assert served.status_code == 200, asset
        assert "javascript" in served.headers["content-type"], asset  # module scripts need it


def test_api_key_is_kept_per_tab_unless_remembered(tmp_path: Path, browser: Any) -> None:
    with rolechat_serve(tmp_path / "keyed", "--api-key", KEY) as base:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(base)
            page.wait_for_selector("#api-key", state="visible")
            assert page.is_visible("#error") and not page.is_checked("#api-key-remember")
            page.fill("#api-key", KEY)
            page.press("#api-key", "Enter")
            page.wait_for_selector("body[data-ready='1']")
            assert page.text_content("#model") == "SmolLM2-135M-Instruct.Q4_1.gguf"
            assert page.is_hidden("#key-box") and page.is_hidden("#error")
            # By default the key lives in this tab only (sessionStorage): a reload keeps it,
            # another tab asks again.
            assert page.evaluate("sessionStorage.getItem('rolechat.apiKey')") == KEY
            assert page.evaluate("localStorage.getItem('rolechat.apiKey')") is None
            page.reload()
            page.wait_for_selector("body[data-ready='1']")
            assert page.is_hidden("#key-box")

            other = context.new_page()
            other.set_default_timeout(30_000)
            other.goto(base)
            other.wait_for_selector("#api-key", state="visible")
            # A wrong key is refused and forgotten, and the page asks again.
            other.fill("#api-key", "wrong")
            other.press("#api-key", "Enter")
            other.wait_for_function(
                "document.getElementById('error').textContent.includes('refused')")
            assert other.is_visible("#api-key")
            assert other.evaluate("sessionStorage.getItem('rolechat.apiKey')") is None
            # "Remember on this device": localStorage, which every tab shares.
            other.check("#api-key-remember")
            other.fill("#api-key", KEY)
            other.press("#api-key", "Enter")
            other.wait_for_selector("body[data-ready='1']")
            assert other.evaluate("localStorage.getItem('rolechat.apiKey')") == KEY
            assert other.evaluate("sessionStorage.getItem('rolechat.apiKey')") is None

            third = context.new_page()
            third.set_default_timeout(30_000)
            third.goto(base)
            third.wait_for_selector("body[data-ready='1']")
            assert third.is_hidden("#key-box")
            assert third.text_content("#model") == "SmolLM2-135M-Instruct.Q4_1.gguf"
        finally:
            context.close()
