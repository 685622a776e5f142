"""`rolechat models list|show` and `--model NAME` over the stores other tools keep (built in a
temp home: tests/model_stores.py), in a real subprocess."""

from __future__ import annotations

import json
import types
from pathlib import Path

import psutil
import pytest

from model_stores import GGUF, NAMES, STORE_VARIABLES, build_stores
from rolechat.cli.options import warn_if_too_big
from rolechat.models import EMBEDDED


def test_the_cli_lists_shows_and_chats_with_them(cli, tmp_path: Path) -> None:
    home = tmp_path / "home"
    build_stores(home)
    cli.env = {**{k: v for k, v in cli.env.items() if k not in STORE_VARIABLES},
               "HOME": str(home)}
    listed = json.loads(cli.ok("models", "list", "--json").out)
    assert {row["name"] for row in listed} == {EMBEDDED, *NAMES}
    table = cli.run("models", "list")
    assert table.code == 0 and "ollama:smollm2:135m" in table.out
    assert "broken.gguf left out" in table.err
    shown = json.loads(cli.ok("models", "show", "ollama:smollm2:135m", "--json").out)
    assert shown["quantization"] == "Q4_1" and shown["parameters"] == "135M"
    assert "<|im_start|>" in shown["chat_template"]
    assert "Unknown model 'nope:x'" in cli.fails("models", "show", "nope:x", code=2)
    answer = cli.ask_json("--model", "lmstudio:lmstudio-community/Tiny-GGUF:Tiny-Q4_1.gguf",
                          *cli.FAST, "Hi")
    assert answer["response"] and Path(answer["model"]).name == "Tiny-Q4_1.gguf"


def test_a_model_bigger_than_the_free_ram_is_said_before_loading(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(
        available=50_000_000))
    warn_if_too_big(str(GGUF), "llama.cpp")
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: this model's weights take 93.8 MiB and 47.7 MiB of RAM is free now" in err
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(
        available=8_000_000_000))
    warn_if_too_big(str(GGUF), "llama.cpp")
    assert capsys.readouterr().err == ""
