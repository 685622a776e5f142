"""The web page's model picker in real headless Chromium, against a real ``rolechat serve`` in a
home whose stores hold the embedded model under several names (tests/model_stores.py): the
picker lists ``/v1/models`` with the loaded model selected, the model picked is sent with the
next message (the server switches to it; a 503 ``model_loading`` on the way is waited out
with "Loading MODEL…"), and the choice survives a reload."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from model_stores import STORE_VARIABLES, build_stores
from pages import blank_page, chromium, idle, load, needs_chromium
from servers import ROLECHAT, free_port, running

START = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKED = "ollama:smollm2:135m"

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("page-models-home")
    build_stores(home)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in STORE_VARIABLES},
           "HOME": str(home), "ROLECHAT_HOME": str(home / "rolechat")}
    command = [str(ROLECHAT), "serve", "--port", str(port), "--context-length", "1024",
               "--threads", "1", "--parallel", "1"]
    base = f"http://127.0.0.1:{port}"
    with running(command, f"{base}/v1/models", env=env):
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    errors: list[str] = []
    opened = blank_page(browser, errors)
    yield opened
    opened.context.close()
    assert not errors, errors


def test_the_picker_lists_the_models_and_the_next_reply_comes_from_the_one_picked(
        server: str, page: Any) -> None:
    listed = [m["id"] for m in httpx.get(f"{server}/v1/models", timeout=30).json()["data"]]
    load(page, server)
    picker = page.locator("#model-box").get_by_label("Model")  # the select, labelled
    assert page.is_visible("#model-box") and page.is_hidden("#model")
    assert page.eval_on_selector_all("#model-picker option", "os => os.map(o => o.value)") \
        == listed
    assert listed[0] == START and picker.input_value() == START
    assert "(loaded)" in (page.text_content("#model-picker option:checked") or "")

    picker.select_option(PICKED)
    assert PICKED in (page.text_content("#notice") or "")
    # The first message on the way is answered "loading" once: the page says so and waits.
    answered: list[str] = []

    def loading_once(route: Any) -> None:
        if answered:
            route.continue_()
            return
        answered.append(route.request.post_data or "")
        route.fulfill(status=503, headers={"Retry-After": "1"}, content_type="application/json",
                      body=json.dumps({"error": {
                          "message": "Loading the model.", "type": "server_error",
                          "param": "model", "code": "model_loading"}}))

    page.route("**/v1/conversations/*/messages", loading_once)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "8")
    page.fill("#input", "Say hi.")
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('notice').textContent"
                           f".includes('Loading {PICKED}')")
    page.wait_for_selector(".msg.assistant .usage")
    idle(page)
    assert json.loads(answered[0])["model"] == PICKED
    status = httpx.get(f"{server}/v1/status", timeout=30).json()
    assert status["model"] == PICKED and status["models"]["switches"] == 1
    assert page.is_hidden("#notice") and page.is_hidden("#error")
    assert page.text_content("#model-picker option:checked") == f"{PICKED} (loaded)"

    page.reload()  # the choice is kept on this device
    page.wait_for_selector("body[data-ready='1']:not([data-busy])")
    assert page.locator("#model-box").get_by_label("Model").input_value() == PICKED
    assert page.evaluate("localStorage.getItem('rolechat.model')") == PICKED
    # The Settings panel shows the same choice, and a choice there is the header's too.
    page.click("#system-toggle")
    in_panel = page.locator("#system-panel").get_by_label("Model")
    assert in_panel.is_visible() and in_panel.input_value() == PICKED
    values = "os => os.map(o => o.value)"
    assert page.eval_on_selector_all("#settings-model option", values) == \
        page.eval_on_selector_all("#model-picker option", values)
    assert sorted(page.eval_on_selector_all("#settings-model option", values)) == sorted(listed)
    in_panel.select_option(START)
    assert page.input_value("#model-picker") == START
    assert page.evaluate("localStorage.getItem('rolechat.model')") == START
