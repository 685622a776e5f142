from __future__ import annotations

from pathlib import Path

import pytest

from rolechat import InvalidInput, UnknownName, get_persona, load_personas
from rolechat.persona import BUILTIN, DEFAULT_PERSONA, TUTORIAL_SYSTEM, Persona
from rolechat.window import Window


def test_builtins() -> None:
    assert set(BUILTIN) == {"concise", "tutorial", "expert", "support"}
    assert BUILTIN["tutorial"].system == "你是专业的AI助手，请尽量回答简洁"
    assert BUILTIN["tutorial"].system == TUTORIAL_SYSTEM
    assert "scientific" in BUILTIN["expert"].system
    assert "customer-service" in BUILTIN["support"].system
    assert get_persona().name == DEFAULT_PERSONA == "concise"


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(UnknownName) as info:
        get_persona("pirate")
    assert info.value.valid == ["concise", "expert", "support", "tutorial"]
    assert "Valid personas: concise, expert, support, tutorial" in str(info.value)


def write(home: Path, name: str, text: str) -> Path:
    folder = home / "personas"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_user_persona_from_toml(rolechat_home: Path) -> None:
    path = write(rolechat_home, "pirate", 'description = "Arr"\nsystem = "You are a pirate."\n'
                 "[params]\ntemperature = 0.5\nstop = ['Arr!']\n")
    persona = get_persona("pirate")
    assert persona.system == "You are a pirate." and persona.description == "Arr"
    assert persona.params.explicit() == {"temperature": 0.5, "stop": ("Arr!",)}
    assert persona.source == str(path)
    found, broken = load_personas()
    assert "pirate" in found and not broken


def test_user_file_overrides_builtin(rolechat_home: Path) -> None:
    write(rolechat_home, "concise", 'system = "Mine."\n')
    assert get_persona("concise").system == "Mine."


@pytest.mark.parametrize("text, match", [
    ("system = ", "Cannot read"),
    ('description = "x"\n', "no `system`"),
    ('system = "s"\ncolour = "red"\n', "Unknown keys"),
    ('system = "s"\n[params]\ntemperature = -3\n', "temperature"),
    ('system = "s"\n[params]\nwarmth = 1\n', "unknown parameter"),
    ('system = ""\n', "empty"),
    ("system = 5\n", "must be a string"),
])
def test_broken_persona_files(rolechat_home: Path, text: str, match: str) -> None:
    path = write(rolechat_home, "bad", text)
    with pytest.raises(InvalidInput, match=match) as info:
        get_persona("bad")
    assert str(path) in str(info.value)
    found, broken = load_personas()
    assert "bad" in broken and "concise" in found


def test_persona_window_turns_on_summary_memory(rolechat_home: Path) -> None:
    from fakes import FakeEngine
    from rolechat import Chat

    write(rolechat_home, "remembers", 'system = "Remember things."\n[window]\n'
          'memory = "summary"\nsummary_tokens = 64\n')
    chat = Chat(FakeEngine(), persona="remembers")
    assert chat.window.summarize and chat.window.summary_cap(2048) == 64
    write(rolechat_home, "bad", 'system = "x"\n[window]\nmemory = "everything"\n')
    with pytest.raises(InvalidInput, match=r"memory: must be one of none, summary.*bad\.toml"):
        get_persona("bad")
    write(rolechat_home, "odd", 'system = "x"\n[window]\nsize = 3\n')
    with pytest.raises(InvalidInput, match=r"Unknown \[window\] keys \['size'\]"):
        get_persona("odd")
    write(rolechat_home, "tpl", 'system = "x"\n[window]\nsummary_template = "Sum up."\n')
    with pytest.raises(InvalidInput, match=r"no \{turns\} placeholder"):
        get_persona("tpl")


def test_window_for_puts_given_over_the_persona_over_the_base() -> None:
    persona = Persona("p", "Be brief.", window={"memory": "summary", "summary_tokens": 40})
    assert persona.window_for() == Window(summarize=True, summary_tokens=40)
    base = Window(summarize=False, summary_tokens=64, max_turns=5)
    assert persona.window_for({"summary_tokens": 32}, base) == Window(
        summarize=True, summary_tokens=32, max_turns=5)
    assert Persona("q", "x").window_for(base=base) == base
