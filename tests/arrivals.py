"""Requests that arrive at an engine's scheduler together: while the block of
:func:`arriving_together` runs, the scheduler waits inside a call, so everything submitted in
the block is admitted in one go when it ends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rolechat.engines.local import LocalEngine


@contextmanager
def arriving_together(engine: LocalEngine) -> Iterator[None]:
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(60)

    thread = threading.Thread(target=engine.scheduler.call, args=(hold,))
    thread.start()
    assert started.wait(60)
    try:
        yield
    finally:
        release.set()
        thread.join(60)
