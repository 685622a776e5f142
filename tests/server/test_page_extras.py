"""Math (KaTeX) and diagrams (Mermaid) in replies, in real headless Chromium against a real
``rolechat serve``: they render, math in code stays code, a broken diagram says so, and the
attack strings either library might pass on never execute."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pages import chromium, idle, needs_chromium, open_page
from rolechat.store import Store
from servers import rolechat_serve

MATH = r"""Energy: $E = mc^2$, and it costs $5 or $6 (not math).

$$\int_0^1 x^2 \, dx = \frac{1}{3}$$

Also \(a_1 + a_2\) and \[\sum_{i=1}^n i = \frac{n(n+1)}{2}\]

In code it stays code: `$x$` and

```
$$not math$$
```

Attacks: $\href{javascript:window.__xss=8}{click}$ and $\url{javascript:window.__xss=9}$
and $\htmlData{onclick=window.__xss=10}{x}$ and $<img src=x onerror="window.__xss=11">$
"""
DIAGRAM = """A flow:

```mermaid
graph TD
  A[Start] --> B{"<img src=x onerror='window.__xss=12'>"}
  B --> C[Done]
  click A href "javascript:window.__xss=13"
  click C callback "window.__xss=14"
```

And one that is broken:

```mermaid
graph TD
  A -->
```
"""

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("page-extras-home")
    store = Store(home / "rolechat.db")
    for title, reply in (("Seeded math", MATH), ("Seeded diagram", DIAGRAM)):
        cid = store.create(title=title)
        store.complete_turn(cid, store.begin_turn(cid, "Show me."), reply, 30, {})
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
    opened = open_page(browser, server, errors)
    yield opened
    opened.context.close()
    assert not errors, errors


def open_conversation(page: Any, title: str) -> Any:
    page.locator("#conversations button.conv-text", has_text=title).click()
    idle(page)
    return page.locator("[data-testid=msg-assistant] .content").last


def test_math_renders_as_mathml_and_its_attacks_stay_inert(page: Any) -> None:
    reply = open_conversation(page, "Seeded math")
    page.wait_for_selector("[data-testid=msg-assistant] math")
    formulas = reply.locator("math")
    errors = reply.locator(".katex-error")  # what KaTeX refuses is shown as its TeX, as text
    # E=mc², the integral, a₁+a₂, the sum, and the 4 attacks (rendered inert, or refused)
    assert formulas.count() + errors.count() == 8 and formulas.count() >= 6
    assert reply.locator("math[display=block]").count() == 2
    assert formulas.first.text_content() == "E=mc2" and "$5 or $6" in reply.inner_text()
    assert "\\int" not in reply.inner_text()  # the TeX is not shown beside its formula
    assert reply.locator("code", has_text="$x$").count() == 1
    assert "$$not math$$" in reply.locator("pre").inner_text()
    assert reply.locator("a").count() == 0  # \href and \url are not links without trust
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert page.evaluate("document.querySelectorAll('[onclick],[onerror]').length") == 0


def test_a_diagram_is_an_image_of_its_svg_and_a_broken_one_says_so(page: Any) -> None:
    reply = open_conversation(page, "Seeded diagram")
    diagrams = reply.locator("[data-testid=diagram]")
    page.wait_for_function("document.querySelectorAll('[data-testid=diagram] img').length === 1"
                           " && document.querySelectorAll('.diagram.failed').length === 1",
                           timeout=60_000)
    image = diagrams.first.locator("img")
    assert image.get_attribute("src").startswith("data:image/svg+xml")
    width = image.evaluate("async img => { try { await img.decode(); } catch (e) {"
                           " return 'not an image: ' + e; } return img.naturalWidth; }")
    assert isinstance(width, int) and width > 50, width
    assert "Start" in image.get_attribute("alt") or "graph TD" in image.get_attribute("alt")
    assert "could not be drawn" in diagrams.nth(1).inner_text()
    assert reply.locator("code.language-mermaid").count() == 2  # the source stays
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert page.evaluate("document.querySelectorAll('svg [onclick], [onerror]').length") == 0
