"""The ``rolechat`` command group (its commands register on it from :mod:`.commands`).

Contract: commands mirror library nouns (``ask``, ``chat``, ``prompt``, ``personas``). They hold
no logic the library lacks. A :class:`~rolechat.errors.RolechatError` becomes one line on
stderr (``error: what was wrong. What to do.``) and the error's exit code; Ctrl-C exits 130,
SIGTERM and SIGHUP 143 and 129 (a reply in progress is stored ``interrupted``), and a closed
stdout (``| head``) ends quietly with 0.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from .. import __version__
from ..errors import RolechatError
from .render import echo


class RolechatGroup(click.Group):
    """Translates library errors into a one-line message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RolechatError as exc:
            echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
        except BrokenPipeError:
            _stdout_gone()


@click.group(cls=RolechatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rolechat")
def cli() -> None:
    """Chat with a local language model: personas, history, a sliding window, KV-cache reuse."""


class Terminated(SystemExit):
    """SIGTERM or SIGHUP: leave like Ctrl-C does (a reply in progress is marked interrupted,
    snapshot files are finished), with the conventional exit status."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def _stdout_gone() -> None:
    """The reader of stdout went away (``rolechat ask ... | head -1``): stop quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
    sys.exit(0)


def run() -> None:
    """Run the command line: click's own usage errors become one ``error:`` line too."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)
    try:
        code = cli.main(standalone_mode=False)
    except BrokenPipeError:
        _stdout_gone()
    except click.ClickException as exc:
        where = getattr(getattr(exc, "ctx", None), "command_path", "rolechat")
        echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["RolechatGroup", "Terminated", "cli", "run"]
