"""The ``rolechat`` command: a thin edge over the library.

Contract: commands mirror library nouns (``ask``, ``chat``, ``prompt``, ``personas``). They hold
no logic the library lacks. A :class:`~rolechat.errors.RolechatError` becomes one line on
stderr (``error: what was wrong. What to do.``) and the error's exit code; Ctrl-C exits 130,
SIGTERM and SIGHUP 143 and 129 (a reply in progress is stored ``interrupted``), and a closed
stdout (``| head``) ends quietly with 0. The group lives in :mod:`rolechat.cli.group`, its
commands in the modules :mod:`rolechat.cli.commands` registers; this module imports them only
when :func:`main` runs, so that Ctrl-C at any moment of start-up, while they are still being
imported, exits 130 too, with no traceback.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: importing typing takes a while, and Ctrl-C may come
if TYPE_CHECKING:
    from typing import Any

    from .group import cli as cli


def main() -> None:
    """The ``rolechat`` console script."""
    try:
        from . import commands  # noqa: F401  (they register)
        from .group import run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(130)


def __getattr__(name: str) -> Any:
    """``cli`` (the click group), imported when it is first asked for."""
    if name == "cli":
        from . import commands  # noqa: F401  (they register)
        from .group import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["cli", "main"]
