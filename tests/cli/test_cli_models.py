"""`rolechat models list|show` and `--model NAME` over the stores other tools keep (built in a
temp home: tests/model_stores.py), in a real subprocess."""

from __future__ import annotations

import json
from pathlib import Path

from model_stores import NAMES, STORE_VARIABLES, build_stores
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
