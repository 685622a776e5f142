"""Hostile flags through the real ``rolechat`` command (issue 19, items 5 and 6): each fails at
once with one error line and its exit code, never a traceback or a hang."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from conftest import Cli
from rolechat.engines.llama_cpp import embedded_model_path
from rolechat.engines.options import logical_cpus

INVALID, MODEL = 2, 4


def test_threads_above_the_logical_cpus_are_refused(cli: Cli) -> None:
    too_many = logical_cpus() + 1
    line = cli.fails("ask", "hi", "--threads", str(too_many), code=INVALID)
    assert (f"--threads: must be at most {logical_cpus()}, the number of logical CPUs this "
            f"machine has (got {too_many})") in line


@pytest.mark.parametrize("args", [("ask", "hi"), ("prompt", "-u", "hi"), ("chat",)])
def test_a_thousand_threads_are_refused(cli: Cli, args: tuple[str, ...]) -> None:
    line = cli.fails(*args, "--threads", "1000", code=INVALID)
    assert "(got 1000)" in line


def test_a_damaged_gguf_header_is_one_line(cli: Cli, tmp_path: Path) -> None:
    # The first key's length (after magic, version and the two counts) becomes 2**63: an
    # OverflowError traceback before.
    head = bytearray(embedded_model_path().read_bytes()[:1 << 20])
    head[24:32] = struct.pack("<Q", 2**63)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(bytes(head))
    line = cli.fails("ask", "hi", "--model", str(damaged), code=MODEL)
    assert "the GGUF header is damaged (a string would need 9,223,372,036,854,775,808 bytes" in line


@pytest.mark.parametrize("template, expected", [
    ("{{ 'x' * 10**10 }}", "The chat template repeats a string of 1 character 10,000,000,000 "
                           "times (10,000,000,000 characters)"),  # ran until it was killed
    ("{% include 'other.jinja' %}", "The chat template uses {% include %} (line 1), but a chat "
                                    "template cannot load other templates"),  # TypeError
    ("{% for i in range(10**12) %}{% endfor %}",
     "The chat template calls range(1000000000000)"),  # OverflowError
    ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
     "The chat template nests macro calls (or recursive loops) more than"),  # RecursionError
])
def test_a_hostile_chat_template_is_one_line(cli: Cli, template: str, expected: str) -> None:
    line = cli.fails("ask", "hi", "--chat-template", template, "--threads", "1", code=INVALID)
    assert expected in line
    assert line.endswith("Fix or replace the template (--chat-template, or chat_template=...).")
