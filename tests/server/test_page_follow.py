"""The page follows its conversation (static/follow.js over GET .../events), in real headless
Chromium against uvicorn in-process over the fake engine writing at a set pace: a second tab
shows the first tab's reply as it is written and then as stored, and can stop it; a reload in
the middle of a reply re-attaches to it and the stored reply is complete; a reply a crash cut
(its writer SIGKILLed) shows its saved text, interrupted, with Retry; a server that stops
answering shows a connection-lost line, then Resend for the message that failed. The end of a
reply stays in sight above the composer, at desktop and phone sizes, unless the reader
scrolled up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes import PacedEngine
from pages import PHONE, WIDE, api, chromium, needs_chromium, open_page, ready
from rolechat.server import create_app
from rolechat.store import Store
from servers import in_process

#: The reply the paced fake writes (a token every 15 ms: about 7 s; under the 512 tokens a
#: reply may have), long enough that a loaded machine still catches it in the middle (a
#: reload, a stop).
REPLY = " ".join(f"Sentence {i} of a reply written slowly enough to be watched." for i in
                 range(1, 9))

pytestmark = needs_chromium

#: Begins a turn in the store, saves its reply's text so far (as a server does), then waits
#: to be killed.
CRASHING_WRITER = textwrap.dedent("""
    import sys
    from rolechat.store import Store

    store = Store(sys.argv[1])
    cid = store.create(title="Cut by a crash")
    user = store.begin_turn(cid, "Will this survive?")
    store.save_partial(user, "Half of an answer")
    print(cid, flush=True)
    sys.stdin.readline()
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path = tmp_path_factory.mktemp("page-follow") / "rolechat.db"
    Store(path).close()
    writer = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert writer.stdout is not None
    crashed = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    store = Store(path)  # the restarted server's store
    engine = PacedEngine()
    engine.pace, engine.reply = 0.015, REPLY
    app = create_app(engine, store=store)
    with in_process(app) as url:
        yield {"url": url, "crashed": crashed, "engine": engine}
    store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    contexts: list[Any] = []
    errors: list[str] = []

    def make(url: str, viewport: dict[str, int] | None = None) -> Any:
        page = open_page(browser, url, errors, viewport=viewport or WIDE)
        contexts.append(page.context)
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, errors


def conversation(url: str) -> int:
    return int(api(url, "POST", "/conversations", json={})["id"])


def stored(url: str, cid: int) -> list[tuple[str, str, str]]:
    return [(m["role"], m["status"], m["content"])
            for m in api(url, "GET", f"/conversations/{cid}")["messages"]]


def live_text(page: Any) -> str:
    return str(page.evaluate(
        "document.querySelector('.msg.assistant.live .content')?.textContent ?? ''")).strip()


def test_a_second_tab_shows_the_reply_as_it_is_written_then_as_stored(
        served: dict[str, Any], new_page: Callable[..., Any]) -> None:
    url = served["url"]
    cid = conversation(url)
    writer, watcher = new_page(f"{url}/#c={cid}"), new_page(f"{url}/#c={cid}")
    writer.fill("#input", "Tell me something.")
    writer.press("#input", "Enter")
    # The watching tab shows the message and the reply growing, with Stop, before it ends.
    watcher.wait_for_function("(document.querySelector('.msg.assistant.live .content')"
                              "?.textContent || '').length > 20")
    seen = live_text(watcher)
    assert REPLY.startswith(seen) and len(seen) < len(REPLY)
    assert watcher.is_visible("#stop") and watcher.is_disabled("#send")
    watcher.wait_for_function("[...document.querySelectorAll('.msg.user .content')]"
                              ".map(n => n.textContent).join('|') === 'Tell me something.'")
    # Then the stored turn, as the writing tab shows it.
    watcher.wait_for_function("document.querySelectorAll('.msg.assistant.live').length === 0 &&"
                              " document.querySelectorAll('.msg.assistant[data-id]').length")
    ready(watcher)
    assert watcher.locator(".msg.assistant .content").inner_text().strip() == REPLY
    assert watcher.is_hidden("#stop") and watcher.is_enabled("#send")
    assert watcher.locator("[data-testid=undo]").count() == 1  # it may act on the turn now
    ready(writer)
    assert stored(url, cid) == [("user", "complete", "Tell me something."),
                                ("assistant", "complete", REPLY)]


def test_a_reload_in_the_middle_of_a_reply_re_attaches_to_it(
        served: dict[str, Any], new_page: Callable[..., Any]) -> None:
    url = served["url"]
    cid = conversation(url)
    page = new_page(f"{url}/#c={cid}")
    page.fill("#input", "Keep going while I reload.")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant.streaming .content')"
                           "?.textContent || '').length > 10")
    page.reload()
    ready(page)
    # The reply is still being written: the page shows it growing, then as stored.
    page.wait_for_function("(document.querySelector('.msg.assistant.live .content')"
                           "?.textContent || '').length > 20")
    page.wait_for_function("document.querySelectorAll('.msg.assistant.live').length === 0 &&"
                           " document.querySelectorAll('.msg.assistant[data-id]').length")
    ready(page)
    assert page.locator(".msg.assistant .content").inner_text().strip() == REPLY
    assert page.locator(".msg.interrupted").count() == 0
    assert stored(url, cid) == [("user", "complete", "Keep going while I reload."),
                                ("assistant", "complete", REPLY)]


def test_a_tab_stops_the_reply_another_tab_sent(served: dict[str, Any],
                                                new_page: Callable[..., Any]) -> None:
    url = served["url"]
    cid = conversation(url)
    writer, watcher = new_page(f"{url}/#c={cid}"), new_page(f"{url}/#c={cid}")
    writer.fill("#input", "Stop me from elsewhere.")
    writer.press("#input", "Enter")
    watcher.wait_for_function("(document.querySelector('.msg.assistant.live .content')"
                              "?.textContent || '').length > 10")
    watcher.keyboard.press("Escape")  # Esc stops, as the Stop button does
    watcher.wait_for_selector(".msg.assistant.interrupted")
    ready(watcher)
    messages = stored(url, cid)
    assert messages[0] == ("user", "interrupted", "Stop me from elsewhere.")
    assert messages[1][:2] == ("assistant", "interrupted")
    assert REPLY.startswith(messages[1][2]) and 10 <= len(messages[1][2]) < len(REPLY)
    shown = watcher.locator(".msg.assistant.interrupted .content").inner_text()
    assert shown.strip() == messages[1][2].strip()
    writer.wait_for_selector(".msg.user.interrupted")
    assert writer.is_enabled("#send") and writer.is_hidden("#stop")


def test_a_reply_cut_by_a_crash_shows_its_text_and_offers_retry(
        served: dict[str, Any], new_page: Callable[..., Any]) -> None:
    url, cid = served["url"], served["crashed"]
    assert stored(url, cid) == [("user", "interrupted", "Will this survive?"),
                                ("assistant", "interrupted", "Half of an answer")]
    page = new_page(f"{url}/#c={cid}")
    assert page.locator(".msg.pending").count() == 0
    assert page.locator(".msg.assistant.interrupted .content").inner_text() == "Half of an answer"
    page.click("[data-testid=retry-message]")
    page.wait_for_selector(".msg.assistant[data-id]:not(.interrupted)")
    ready(page)
    assert stored(url, cid)[2:] == [("user", "complete", "Will this survive?"),
                                    ("assistant", "complete", REPLY)]
    assert page.locator("[data-testid=retry-message]").count() == 0


def test_a_lost_connection_is_said_and_a_failed_message_can_be_resent(
        tmp_path: Path, new_page: Callable[..., Any]) -> None:
    """The server stops (its event streams end, then nothing answers) and starts again on
    the same port."""
    store = Store(tmp_path / "rolechat.db")
    engine = PacedEngine()
    engine.pace, engine.reply = 0.015, REPLY
    with in_process(create_app(engine, store=store)) as url:
        cid = conversation(url)
        page = new_page(f"{url}/#c={cid}")
    page.wait_for_selector("#connection:not([hidden])")
    assert "not answering" in page.inner_text("#connection")
    page.fill("#input", "Sent while away.")
    page.press("#input", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    ready(page)
    assert page.input_value("#input") == "Sent while away."  # nothing lost
    port = int(url.rsplit(":", 1)[1])
    with in_process(create_app(engine, store=store), port=port):
        page.wait_for_selector("[data-testid=resend]:not([hidden])")
        assert "not sent" in page.inner_text("#connection")
        assert page.is_hidden("#error")  # the network error is over
        page.click("[data-testid=resend]")
        page.wait_for_selector(".msg.assistant[data-id]")
        ready(page)
        assert stored(url, cid) == [("user", "complete", "Sent while away."),
                                    ("assistant", "complete", REPLY)]
        assert page.is_hidden("#connection") and page.input_value("#input") == ""
    store.close()


LONG = "\n\n".join(f"Paragraph {i}: " + "many words " * 12 for i in range(6))


def end_in_sight(page: Any) -> bool:
    """The last reply's action row is inside the scrolled view, above the composer."""
    return bool(page.evaluate("""() => {
        const reply = [...document.querySelectorAll('.msg.assistant')].pop();
        const actions = reply.querySelector('.msg-actions').getBoundingClientRect();
        const view = document.getElementById('messages').getBoundingClientRect();
        const composer = document.getElementById('composer').getBoundingClientRect();
        return actions.top >= view.top && actions.bottom <= view.bottom + 1
            && actions.bottom <= composer.top + 1;
    }"""))


@pytest.mark.parametrize("viewport", [WIDE, PHONE],
                         ids=["desktop", "phone"])
def test_a_replys_end_stays_in_sight_unless_the_reader_scrolls_up(
        served: dict[str, Any], new_page: Callable[..., Any], viewport: dict[str, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, engine = served["url"], served["engine"]
    monkeypatch.setattr(engine, "pace", 0.01)  # a long reply, streamed in a few seconds
    cid = int(api(url, "POST", "/conversations",
                  json={"params": {"max_new_tokens": 1500}})["id"])
    page = new_page(f"{url}/#c={cid}", viewport)
    engine.replies.append(LONG)
    page.fill("#input", "A long one, please.")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant.streaming .content')"
                           "?.textContent || '').length > 300")
    ready(page)
    assert page.locator(".msg.assistant .content").inner_text().startswith("Paragraph 0")
    assert end_in_sight(page)  # followed to the end: usage and actions above the composer
    # A reader who scrolls up while the next reply streams is left there.
    engine.replies.append(LONG)
    page.fill("#input", "Another.")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant.streaming .content')"
                           "?.textContent || '').length > 50")
    box = page.locator("#messages").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -20_000)  # the reader scrolls up to the start
    page.wait_for_function("document.getElementById('messages').scrollTop < 50")
    ready(page)
    assert page.evaluate("document.getElementById('messages').scrollTop") < 50
    assert not end_in_sight(page)


def test_a_stopped_reply_offers_continue(served: dict[str, Any],
                                         new_page: Callable[..., Any]) -> None:
    url, engine = served["url"], served["engine"]
    cid = conversation(url)
    page = new_page(f"{url}/#c={cid}")
    page.fill("#input", "Start and stop.")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant.streaming .content')"
                           "?.textContent || '').length > 15")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.interrupted [data-testid=continue]")
    ready(page)
    partial = stored(url, cid)[1][2]
    engine.replies.append(" and then the rest.")
    page.click(".msg.assistant.interrupted [data-testid=continue]")
    page.wait_for_selector(".msg.assistant[data-id]:not(.interrupted)")
    ready(page)
    assert stored(url, cid) == [("user", "complete", "Start and stop."),
                                ("assistant", "complete", partial + " and then the rest.")]
    assert page.locator(".msg.interrupted").count() == 0
    shown = page.locator(".msg.assistant .content").inner_text()
    assert shown.split() == (partial + " and then the rest.").split()  # as Markdown shows it
