"""`rolechat personas` and `--persona`: built-ins and user TOML files in $ROLECHAT_HOME."""

from __future__ import annotations

import json

BUILTINS = ["concise", "tutorial", "expert", "support"]
PIRATE = 'description = "Talks like a pirate"\nsystem = "You are a pirate. Answer in pirate ' \
         'speak."\n\n[params]\ntemperature = 0.5\n'


def persona_file(cli, name: str, text: str):
    path = cli.home / "personas" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def listed(cli) -> tuple[dict[str, dict], str]:
    result = cli.ok("personas", "--json")
    data = json.loads(result.out)
    return {p["name"]: p for p in data}, result.err


def test_builtin_personas_listed_as_json(cli):
    personas, err = listed(cli)
    assert list(personas) == BUILTINS
    assert err == ""
    assert personas["tutorial"]["system"] == "你是专业的AI助手，请尽量回答简洁"
    assert personas["expert"]["params"] == {"temperature": 0.3}
    assert personas["concise"]["params"] == {}
    for persona in personas.values():
        assert persona["source"] == "built-in"
        assert persona["system"] and persona["description"]


def test_personas_table(cli):
    result = cli.ok("personas")
    for name in BUILTINS:
        assert name in result.out
    assert "concise (default)" in result.out
    assert "Add your own:" in result.out


def test_ask_with_the_tutorial_persona(cli):
    data = cli.ask_json("你好", "--persona", "tutorial", *cli.FAST)
    assert data["persona"] == "tutorial"
    assert data["response"].strip()


def test_user_persona_file_is_listed_and_usable(cli):
    path = persona_file(cli, "pirate", PIRATE)
    personas, err = listed(cli)
    assert err == ""
    assert list(personas) == [*BUILTINS, "pirate"]
    pirate = personas["pirate"]
    assert pirate["source"] == str(path)
    assert pirate["params"] == {"temperature": 0.5}
    assert pirate["system"] == "You are a pirate. Answer in pirate speak."
    assert pirate["description"] == "Talks like a pirate"
    data = cli.ask_json("Where is the treasure?", "--persona", "pirate", *cli.FAST)
    assert data["persona"] == "pirate"
    assert data["response"].strip()
    shown = cli.ok("prompt", "--persona", "pirate", "--user", "Ahoy")
    assert "<|im_start|>system\nYou are a pirate. Answer in pirate speak.<|im_end|>" in shown.out


def test_user_file_overrides_a_builtin(cli):
    path = persona_file(cli, "concise", 'system = "Answer in one word."\n')
    personas, _ = listed(cli)
    assert personas["concise"]["source"] == str(path)
    assert personas["concise"]["system"] == "Answer in one word."
    shown = cli.ok("prompt", "--persona", "concise", "--user", "Hi")
    assert shown.out.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n")


def test_broken_persona_file_warns_but_the_others_still_list(cli):
    persona_file(cli, "pirate", PIRATE)
    broken = persona_file(cli, "broken", 'system = "unterminated\n')
    for args in (("personas", "--json"), ("personas",)):
        result = cli.ok(*args)
        warnings = result.err.splitlines()
        assert len(warnings) == 1, result.err
        assert warnings[0].startswith("warning: persona 'broken' is broken")
        assert str(broken) in warnings[0]
        for name in [*BUILTINS, "pirate"]:
            assert name in result.out
    personas, _ = listed(cli)
    assert "broken" not in personas
    line = cli.fails("ask", "hi", "--persona", "broken", *cli.FAST, code=2)
    assert str(broken) in line
    assert "TOML" in line


def test_persona_file_with_bad_params_names_the_file_and_field(cli):
    path = persona_file(cli, "hot", 'system = "Be hot."\n[params]\ntemperature = 99\n')
    line = cli.fails("ask", "hi", "--persona", "hot", code=2)
    assert str(path) in line and "temperature" in line
