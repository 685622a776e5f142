"""Where rolechat keeps its data: one home folder.

Contract: :func:`home` is ``$ROLECHAT_HOME`` when set, else the platform's user data folder for
"rolechat" (platformdirs). Nothing is created until a caller asks for a sub-folder with
:func:`home_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_path


def home() -> Path:
    """The rolechat home folder (may not exist yet)."""
    env = os.environ.get("ROLECHAT_HOME")
    return Path(env).expanduser() if env else user_data_path("rolechat", appauthor=False)


def home_dir(*parts: str) -> Path:
    """A folder inside the home folder, created if missing."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
