from __future__ import annotations

import pytest

from rolechat import GenerationParams, InvalidParams


def test_defaults_follow_the_tutorial() -> None:
    params = GenerationParams()
    assert params.max_new_tokens == 512
    assert params.temperature == 0.9
    assert params.seed is None and params.stop == ()
    assert not params.greedy and GenerationParams(temperature=0).greedy


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.1, "greater than or equal to 0"),
    ("top_p", 0.0, "greater than 0"),
    ("top_p", 1.5, "less than or equal to 1"),
    ("max_new_tokens", 0, "greater than 0"),
    ("max_new_tokens", -5, "greater than 0"),
    ("top_k", -1, "greater than or equal to 0"),
    ("repetition_penalty", 0, "greater than 0"),
    ("seed", -1, "greater than or equal to 0"),
    ("temperature", "hot", "valid number"),
    ("stop", [""], "must not be empty"),
])
def test_out_of_range(field: str, value: object, words: str) -> None:
    with pytest.raises(InvalidParams) as info:
        GenerationParams(**{field: value})
    assert info.value.problems[0][0] == field
    assert words in str(info.value)
    assert repr(value) in str(info.value)  # says what it got


def test_every_problem_is_reported() -> None:
    with pytest.raises(InvalidParams) as info:
        GenerationParams(temperature=-1, top_p=2)
    assert [field for field, _ in info.value.problems] == ["temperature", "top_p"]


def test_unknown_parameter_lists_valid_ones() -> None:
    with pytest.raises(InvalidParams, match="unknown parameter") as info:
        GenerationParams(temprature=0.5)
    assert "temperature" in str(info.value)


def test_stop_accepts_one_string() -> None:
    assert GenerationParams(stop="\n\n").stop == ("\n\n",)


def test_merged_layers_and_validates() -> None:
    persona = GenerationParams(temperature=0.3)
    merged = persona.merged(max_new_tokens=64, seed=None)
    assert (merged.temperature, merged.max_new_tokens, merged.seed) == (0.3, 64, None)
    assert merged.explicit() == {"temperature": 0.3, "max_new_tokens": 64}
    with pytest.raises(InvalidParams):
        persona.merged(top_p=7)


def test_frozen() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        GenerationParams().temperature = 1.0  # type: ignore[misc]


def test_from_mapping_ignores_none() -> None:
    assert GenerationParams.from_mapping({"seed": None, "top_k": 5}).explicit() == {"top_k": 5}
    assert GenerationParams.from_mapping(None) == GenerationParams()


def test_temperature_range_is_openais() -> None:
    assert GenerationParams(temperature=2).temperature == 2.0
    with pytest.raises(InvalidParams, match="less than or equal to 2"):
        GenerationParams(temperature=2.01)


@pytest.mark.parametrize("field, value, words", [
    ("temperature", True, "valid number"),
    ("top_p", False, "valid number"),
    ("max_new_tokens", "4", "valid integer"),
    ("max_new_tokens", True, "valid integer"),
    ("max_new_tokens", 4.0, "valid integer"),
    ("top_k", "40", "valid integer"),
    ("seed", True, "valid integer"),
    ("temperature", "0.5", "valid number"),
])
def test_types_are_strict(field: str, value: object, words: str) -> None:
    with pytest.raises(InvalidParams) as info:
        GenerationParams(**{field: value})
    assert info.value.problems[0][0] == field
    assert words in str(info.value) and repr(value) in str(info.value)


def test_stop_strings_must_be_strings() -> None:
    with pytest.raises(InvalidParams, match="valid string") as info:
        GenerationParams(stop=["ok", 1])
    assert info.value.problems[0][0] == "stop.1"


def test_what_json_toml_and_flags_give_is_accepted() -> None:
    params = GenerationParams.from_mapping(
        {"temperature": 1, "top_p": 0.5, "max_new_tokens": 64, "seed": 7, "stop": ["a", "b"],
         "repetition_penalty": 1})
    assert (params.temperature, params.repetition_penalty, params.stop) == (1.0, 1.0,
                                                                              ("a", "b"))
    assert isinstance(params.temperature, float)
    again = GenerationParams(**params.explicit())  # what the store keeps comes back the same
    assert again == params
    assert params.merged(stop="x").stop == ("x",)


def test_a_conversation_stored_with_an_old_range_still_resumes(tmp_path) -> None:
    from fakes import FakeEngine
    from rolechat.saved import SavedChat
    from rolechat.store import Store

    store = Store(tmp_path / "rolechat.db")
    saved = SavedChat.new(FakeEngine(), store=store, params=GenerationParams(max_new_tokens=20))
    saved.send("one")
    assert saved.cid is not None
    store.update(saved.cid, params={"temperature": 5.0, "max_new_tokens": 20})  # the old CLI
    resumed = SavedChat.resume(FakeEngine(), store, saved.cid)
    assert resumed.chat.params.explicit() == {"max_new_tokens": 20}
    store.close()
