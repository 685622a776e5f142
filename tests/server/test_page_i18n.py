"""The page in the user's language (static/i18n.js, static/i18n/*.js), in real headless Chromium
(Debian's, through Playwright) against uvicorn as `rolechat serve` runs it, in-process over the
fake engine: a zh-CN browser gets Chinese (the markup, the composer, the shortcuts, the open
conversation's buttons, ``<html lang>``), an en-US one English; the sidebar's select switches
without a reload and the choice survives one; a Chinese conversation is found by the search and
opens at the match; long Chinese text wraps on a phone. And, without a browser: both catalogues
have the same keys, none empty, and every key the page's files use is in them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeEngine
from pages import PHONE, chromium, idle, needs_chromium, open_page, ready
from rolechat.server import create_app
from rolechat.store import Store
from servers import in_process

STATIC = Path(__file__).resolve().parents[2] / "src/rolechat/server/static"

LONG_TITLE = "周末在家做饭的计划" * 6
LONG_TEXT = "今天想试着做一道从来没做过的新菜，" * 30 + "http://example.com/" + "很长" * 80

# ----- the catalogues (no browser) ---------------------------------------------------------
ENTRY = re.compile(r'^\s*"([^"\\]+)":\s*"((?:[^"\\]|\\.)*)",?\s*$')


def catalogue(name: str) -> dict[str, str]:
    """A catalogue's entries, read from its file (one `"key": "value",` a line)."""
    entries: dict[str, str] = {}
    text = (STATIC / "i18n" / name).read_text(encoding="utf-8")
    for line in text.splitlines():
        match = ENTRY.match(line)
        if match:
            assert match.group(1) not in entries, f"{name}: {match.group(1)} twice"
            entries[match.group(1)] = match.group(2)
        else:  # nothing else but comments, the braces and blank lines
            assert re.match(r"^\s*(//.*|export default \{|\};|)$", line), f"{name}: {line!r}"
    return entries


def used_keys() -> dict[str, str]:
    """Every catalogue key the page's files name -> where: t("…")/tn("…") in its modules, any
    string literal of a catalogue's namespace ("shortcuts.send" in keys.js' list), and each
    data-i18n* attribute of index.html."""
    namespaces = {key.split(".")[0] for key in catalogue("en.js")}
    found: dict[str, str] = {}
    for script in sorted(STATIC.glob("*.js")):
        text = script.read_text(encoding="utf-8")
        for match in re.finditer(r'\btn?\(\s*"([^"]+)"', text):
            found[match.group(1)] = script.name
        for match in re.finditer(r'"([a-z][A-Za-z]*\.[A-Za-z.]+)"', text):
            if match.group(1).split(".")[0] in namespaces:
                found[match.group(1)] = script.name
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    for match in re.finditer(r'\bdata-i18n(?:-[a-z-]+)?="([^"]+)"', html):
        found[match.group(1)] = "index.html"
    return found


def test_both_catalogues_have_the_same_keys_and_no_empty_text() -> None:
    en, zh = catalogue("en.js"), catalogue("zh-CN.js")
    assert len(en) > 100
    assert sorted(en) == sorted(zh)
    assert [key for key, text in {**en, **zh}.items() if not text.strip()] == []
    for key in en:  # the same placeholders in both
        assert set(re.findall(r"\{(\w+)\}", en[key])) == set(re.findall(r"\{(\w+)\}", zh[key])), key
    # Chinese is Chinese, not English left in place (a few keys are the same in both).
    same = {key for key in en if en[key] == zh[key]}
    assert same <= {"tab.title", "status.withNote"}, same


def test_every_key_the_page_uses_is_in_the_english_catalogue() -> None:
    en = catalogue("en.js")
    used = used_keys()
    assert len(used) > 100
    missing = {key: where for key, where in used.items()
               if key not in en and not (f"{key}.one" in en and f"{key}.other" in en)}
    assert missing == {}
    # and nothing in the catalogue that the page no longer uses
    unused = [key for key in en if key not in used and re.sub(r"\.(one|other)$", "", key)
              not in used]
    assert unused == []


def test_the_markup_is_written_in_the_catalogues_english() -> None:
    """index.html reads as it always did before i18n.js runs: each translated text and
    attribute is the English catalogue's."""
    en = catalogue("en.js")
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    texts = re.findall(r'<[^<>]*\bdata-i18n="([^"]+)"[^<>]*>([^<]*)<', html)
    assert len(texts) > 20
    for key, text in texts:
        assert " ".join(text.split()) == en[key], key
    for tag in re.findall(r"<[^<>]*\bdata-i18n-[a-z-]+=[^<>]*>", html):
        for attribute, key in re.findall(r'\bdata-i18n-([a-z-]+)="([^"]+)"', tag):
            assert re.search(rf'\s{attribute}="{re.escape(en[key])}"', tag), (attribute, key)


def test_the_page_writes_no_english_of_its_own_outside_the_catalogues() -> None:
    """What the modules used to write as text: gone from their code (comments aside), only in
    the catalogue now."""
    for phrase in ["New conversation", "Untitled conversation", "Reply finished", "Copy reply",
                   "Keyboard shortcuts", "Nothing found for", "Delete this",
                   "This server needs an API key", "Summarize dropped turns"]:
        for script in STATIC.glob("*.js"):
            code = re.sub(r"(^|\s)//.*$", "", script.read_text(encoding="utf-8"), flags=re.M)
            assert phrase not in code, (phrase, script.name)


# ----- in the browser ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store = Store(tmp_path_factory.mktemp("page-i18n") / "rolechat.db")
    cooking = store.create(title="学做饭")
    store.complete_turn(cooking, store.begin_turn(cooking, "先来点别的：周末去哪儿玩？"),
                        "可以去公园散散步。", 5, {})
    store.complete_turn(cooking, store.begin_turn(cooking, "我想学做家常菜"),
                        "可以先从**番茄炒蛋**开始：\n\n```python\nprint('鸡蛋')\n```", 5, {})
    for i in range(8):
        store.complete_turn(cooking, store.begin_turn(cooking, f"第{i}个问题：还有什么？"),
                            f"第{i}个回答：多练习就好。", 5, {})
    long = store.create(title=LONG_TITLE)
    store.complete_turn(long, store.begin_turn(long, LONG_TEXT), LONG_TEXT, 5, {})
    app = create_app(FakeEngine(), store=store)
    with in_process(app) as url:
        yield {"url": url, "cooking": cooking, "long": long}
    store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def open_conversation(page: Any, cid: int) -> None:
    page.click(f"#conversations [data-id='{cid}'] .conv-text")
    idle(page)
    page.wait_for_selector("#messages .msg.assistant")


@needs_chromium
def test_a_zh_cn_browser_gets_chinese_and_the_select_switches(
        browser: Any, seeded: dict[str, Any]) -> None:
    errors: list[str] = []
    page = open_page(browser, seeded["url"], errors, locale="zh-CN")
    assert page.get_attribute("html", "lang") == "zh-CN"
    assert page.input_value("#language") == "zh-CN"
    assert page.inner_text("#new") == "新对话"
    assert page.inner_text("#send") == "发送"
    assert page.inner_text("#title") == "新对话"
    assert page.get_attribute("#input", "placeholder") == "输入消息（Enter 发送，Shift+Enter 换行）"
    assert page.get_attribute("#sidebar", "aria-label") == "对话列表"
    assert page.inner_text("label[for=language]") == "语言"
    assert page.inner_text("#search-open").startswith("搜索")
    assert "家常菜" not in page.inner_text("#messages")

    # the shortcuts dialog ("?" outside a text field)
    page.locator("#new").focus()
    page.keyboard.press("?")
    dialog = page.locator("[data-testid=shortcuts]")
    assert dialog.is_visible()
    said = dialog.inner_text()
    assert "键盘快捷键" in said and "发送消息" in said and "Ctrl+Shift+O" in said
    assert dialog.locator("button").inner_text() == "关闭"
    page.keyboard.press("Escape")
    assert not dialog.is_visible()

    # a conversation's chrome
    open_conversation(page, seeded["cooking"])
    assert page.title() == "学做饭 · rolechat"
    reply = page.locator("[data-testid=msg-assistant]").last
    assert reply.locator("[data-testid=copy]").get_attribute("aria-label") == "复制回复"
    assert page.locator("[data-testid=msg-user] [data-testid=copy]").first.inner_text() == "复制"
    assert page.locator("[data-testid=retry]").inner_text() == "重新生成"
    code_copy = page.locator("[data-testid=copy-code]").first
    assert code_copy.inner_text() == "复制代码"
    assert code_copy.get_attribute("aria-label") == "复制代码（python）"
    listed = page.locator(f"#conversations [data-id='{seeded['cooking']}'] .conv-turns")
    assert listed.inner_text() == "10 轮"

    # to English, without a reload: the markup and the open conversation's chrome
    page.evaluate("window.__same_page = true")
    page.select_option("#language", "en")
    page.wait_for_function("document.documentElement.lang === 'en'")
    idle(page)
    assert page.evaluate("window.__same_page") is True
    assert page.inner_text("#new") == "New conversation"
    assert page.inner_text("#send") == "Send"
    assert page.get_attribute("#input", "placeholder") == \
        "Message (Enter sends, Shift+Enter for a new line)"
    assert page.inner_text("#title") == "学做饭"  # server text stays as written
    reply = page.locator("[data-testid=msg-assistant]").last
    assert reply.locator("[data-testid=copy]").get_attribute("aria-label") == "Copy reply"
    assert page.locator("[data-testid=retry]").inner_text() == "Regenerate"
    assert page.locator("[data-testid=copy-code]").first.inner_text() == "Copy code"
    assert listed.inner_text() == "10 turns"
    page.locator("#new").focus()
    page.keyboard.press("?")
    assert "Keyboard shortcuts" in dialog.inner_text()
    page.keyboard.press("Escape")

    # the choice survives a reload (this device: localStorage)
    page.reload()
    ready(page)
    assert page.get_attribute("html", "lang") == "en"
    assert page.input_value("#language") == "en"
    assert page.inner_text("#new") == "New conversation"
    assert page.title() == "学做饭 · rolechat"  # reopened from the address (#c=)

    # and back to Chinese, kept again
    page.select_option("#language", "zh-CN")
    page.wait_for_function("document.documentElement.lang === 'zh-CN'")
    idle(page)
    assert page.inner_text("#send") == "发送"
    page.reload()
    ready(page)
    assert page.get_attribute("html", "lang") == "zh-CN"
    assert page.inner_text("#new") == "新对话"
    assert page.locator("[data-testid=undo]").inner_text() == "撤销"
    page.context.close()
    assert not errors, errors


@needs_chromium
def test_an_en_us_browser_gets_english(browser: Any, seeded: dict[str, Any]) -> None:
    errors: list[str] = []
    page = open_page(browser, seeded["url"], errors, locale="en-US")
    assert page.evaluate("navigator.language") == "en-US"
    assert page.get_attribute("html", "lang") == "en"
    assert page.input_value("#language") == "en"
    assert page.inner_text("#new") == "New conversation"
    assert page.inner_text("#send") == "Send"
    assert page.inner_text("#title") == "New conversation"
    assert page.get_attribute("#input", "placeholder") == \
        "Message (Enter sends, Shift+Enter for a new line)"
    assert page.inner_text("label[for=language]") == "Language"
    options = page.locator("#language option")
    assert options.all_inner_texts() == ["English", "中文（简体）"]
    assert options.nth(1).get_attribute("lang") == "zh-CN"
    open_conversation(page, seeded["cooking"])
    assert page.locator(f"#conversations [data-id='{seeded['cooking']}'] .conv-turns"
                        ).inner_text() == "10 turns"
    page.context.close()
    assert not errors, errors


@needs_chromium
def test_a_chinese_conversation_is_found_and_opened_at_the_match(
        browser: Any, seeded: dict[str, Any]) -> None:
    errors: list[str] = []
    page = open_page(browser, seeded["url"], errors, locale="zh-CN")
    page.focus("#input")
    page.keyboard.press("Control+k")
    assert page.locator("#search-dialog").is_visible()
    assert page.inner_text("#search-label") == "搜索对话"
    assert page.get_attribute("#search-input", "placeholder") == "输入任意消息或标题中的词"
    page.fill("#search-input", "家常菜")
    page.wait_for_function(
        "() => { const d = document.getElementById('search-dialog');"
        " return d.dataset.query === '家常菜' && d.dataset.state === 'done'; }")
    options = page.locator("#search-results [role=option]")
    assert options.count() == 1
    assert options.first.get_attribute("data-cid") == str(seeded["cooking"])
    assert page.text_content("#search-results mark") == "家常菜"
    assert options.first.locator(".search-hit-role").inner_text() == "你"
    assert page.inner_text("#search-status") == "1 条结果"
    page.keyboard.press("Enter")
    idle(page)
    assert page.inner_text("#title") == "学做饭"
    hit = page.locator("#messages .msg.search-found")
    hit.wait_for()
    assert hit.get_attribute("data-role") == "user" and "家常菜" in (hit.text_content() or "")
    assert page.evaluate("document.activeElement.classList.contains('search-found')")
    assert page.evaluate("""() => {
        const box = document.getElementById('messages').getBoundingClientRect();
        const r = document.querySelector('#messages .msg.search-found').getBoundingClientRect();
        return r.top >= box.top && r.bottom <= box.bottom; }""")
    page.keyboard.press("Control+k")
    page.fill("#search-input", "没有这个词")
    page.wait_for_function(
        "() => document.getElementById('search-dialog').dataset.query === '没有这个词'"
        " && document.getElementById('search-dialog').dataset.state === 'done'")
    assert page.inner_text("#search-status") == "没有找到“没有这个词”。"
    page.keyboard.press("Escape")
    page.context.close()
    assert not errors, errors


@needs_chromium
def test_long_chinese_text_wraps_on_a_phone(browser: Any, seeded: dict[str, Any]) -> None:
    errors: list[str] = []
    page = open_page(browser, seeded["url"], errors, locale="zh-CN", viewport=PHONE)
    page.click("#sidebar-toggle")
    page.wait_for_selector("#sidebar button.conv-text", state="visible")
    item = page.locator(f"#conversations [data-id='{seeded['long']}']")
    assert page.evaluate("""(node) => {
        const side = document.getElementById('sidebar').getBoundingClientRect();
        const title = node.querySelector('.conv-title');
        const r = title.getBoundingClientRect();
        return r.right <= side.right && r.height > 25; }""",
                         item.element_handle())
    item.locator(".conv-text").click()
    idle(page)
    page.wait_for_selector("#messages .msg.assistant")
    width = PHONE["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    assert page.evaluate("""() => { const m = document.getElementById('messages');
        return m.scrollWidth <= m.clientWidth; }""")
    for selector in ["#messages .msg.user", "#messages .msg.assistant", "#title"]:
        box = page.locator(selector).first.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, selector
    # the title wraps (two lines at most) rather than running off the head
    assert page.evaluate("""() => { const t = document.getElementById('title');
        return t.getBoundingClientRect().height > parseFloat(getComputedStyle(t).fontSize) * 1.5
          && t.getBoundingClientRect().right <= window.innerWidth; }""")
    page.context.close()
    assert not errors, errors


@needs_chromium
def test_a_reply_is_announced_and_described_in_chinese(browser: Any,
                                                       seeded: dict[str, Any]) -> None:
    errors: list[str] = []
    page = open_page(browser, seeded["url"], errors, locale="zh-CN")
    assert page.inner_text("#messages .empty") == "说点什么，开始一段新对话吧。"
    page.fill("#input", "你好")
    page.keyboard.press("Enter")
    page.wait_for_selector("#messages .msg.assistant .usage")
    idle(page)
    page.wait_for_function("(document.querySelector('#announcer') || {}).textContent")
    assert page.inner_text("#announcer").startswith("回复完成：")
    assert "个 token" in page.inner_text("#messages .msg.assistant .usage")
    assert page.locator("[data-testid=edit]").inner_text() == "编辑"
    assert page.locator("#conversations button[aria-current=page] .conv-turns").inner_text() \
        == "1 轮"
    page.click("#prompt-toggle")
    page.wait_for_selector("#plan .plan-line")
    assert page.inner_text("#plan .plan-line").startswith("下一条消息（尚未输入内容）")
    page.click("#conv-menu summary")
    assert page.inner_text("#memory-toggle") == "汇总被丢弃的轮次：关"
    page.keyboard.press("Escape")
    page.context.close()
    assert not errors, errors
