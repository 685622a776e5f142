"""Hostile flags through the real ``rolechat`` command (issue 19, items 5 and 6): each fails at
once with one error line and its exit code, never a traceback or a hang."""

from __future__ import annotations

import pytest

from conftest import Cli
from rolechat.engines.options import logical_cpus

INVALID = 2


def test_threads_above_the_logical_cpus_are_refused(cli: Cli) -> None:
    too_many = logical_cpus() + 1
    line = cli.fails("ask", "hi", "--threads", str(too_many), code=INVALID)
    assert (f"--threads: must be at most {logical_cpus()}, the number of logical CPUs this "
            f"machine has (got {too_many})") in line


@pytest.mark.parametrize("args", [("ask", "hi"), ("prompt", "-u", "hi"), ("chat",)])
def test_a_thousand_threads_are_refused(cli: Cli, args: tuple[str, ...]) -> None:
    line = cli.fails(*args, "--threads", "1000", code=INVALID)
    assert "(got 1000)" in line
