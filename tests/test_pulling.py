"""Pull names, the files a pull picks, hub choice, offline refusals and `models rm`'s rules,
without a network (the pulls themselves, over a stand-in hub: tests/test_pull_hub.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from model_stores import GGUF
from rolechat import paths
from rolechat.catalog import ALIASES, GB, quant_of, suggest
from rolechat.errors import InvalidInput, NotPulled, PullError, UnknownName
from rolechat.hubs import Listing, RemoteFile, default_hub, hub
from rolechat.models import find_models, resolve_model
from rolechat.pulling import choose, is_pullable, parse, pull, pulled, remove


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp home with no model stores, and rolechat's home inside it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ROLECHAT_HOME", str(tmp_path / "rolechat"))
    for variable in ("HF_HOME", "HF_HUB_CACHE", "MODELSCOPE_CACHE", "OLLAMA_MODELS",
                     "LMSTUDIO_MODELS", "ROLECHAT_HUB", "HF_HUB_OFFLINE",
                     "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE", "ROLECHAT_OFFLINE",
                     "MODELSCOPE_ENDPOINT", "LC_ALL", "LC_MESSAGES", "LANGUAGE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    return tmp_path


def files(*names: str, size: int = 100) -> Listing:
    return Listing("Owner/Repo-GGUF", "abc", [RemoteFile(n, size, None) for n in names])


@pytest.mark.parametrize(("filename", "quant"), [
    ("qwen2.5-3b-instruct-q4_k_m.gguf", "q4_k_m"), ("Llama-3.2-3B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"), ("m-IQ4_XS.gguf", "IQ4_XS"),
    ("Qwen2.5-7B-Instruct-BF16.gguf", "BF16"), ("sub/x-Q8_0.gguf", "Q8_0"), ("model.gguf", None)])
def test_quantization_is_read_from_the_file_name(filename: str, quant: str | None) -> None:
    assert quant_of(filename) == quant


def test_aliases_name_their_repos_quantization_size_ram_and_licence() -> None:
    for required in ("qwen2.5:0.5b", "qwen2.5:3b", "qwen2.5:7b", "llama3.2:3b", "smollm2:1.7b"):
        alias = ALIASES[required]
        assert alias.repos and all("/" in repo for repo in alias.repos.values())
        assert alias.quant == "Q4_K_M" and alias.licence
        assert 0 < alias.download < alias.ram
    assert ALIASES["qwen2.5:3b"].repos == {"hf": "Qwen/Qwen2.5-3B-Instruct-GGUF",
                                           "modelscope": "Qwen/Qwen2.5-3B-Instruct-GGUF"}


def test_the_suggestion_is_the_largest_alias_that_leaves_room() -> None:
    assert suggest(64 * GB).name == "qwen2.5:7b"
    assert suggest(6 * GB).ram <= 4 * GB and suggest(6 * GB).name.startswith("qwen")
    assert suggest(1 * GB) == min(ALIASES.values(), key=lambda a: a.ram)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "hf"), ({"LANG": "zh_CN.UTF-8"}, "modelscope"), ({"LANG": "en_US.UTF-8"}, "hf"),
    ({"LC_ALL": "zh_CN.UTF-8", "LANG": "en_US"}, "modelscope"), ({"LANG": "zh_TW.UTF-8"}, "hf"),
    ({"LANG": "zh_CN.UTF-8", "ROLECHAT_HUB": "hf"}, "hf"),
    ({"ROLECHAT_HUB": "modelscope"}, "modelscope")])
def test_the_default_hub_follows_the_setting_then_the_locale(env: dict[str, str],
                                                             expected: str) -> None:
    assert default_hub(env) == expected


def test_names_are_parsed_into_hub_repo_and_quantization() -> None:
    china, elsewhere = {"LANG": "zh_CN.UTF-8"}, {"LANG": "en_GB.UTF-8"}
    name = parse("qwen2.5:3b", env=china)
    assert (name.hub, name.repo, name.spec, name.label) == (
        "modelscope", "Qwen/Qwen2.5-3B-Instruct-GGUF", "Q4_K_M", "qwen2.5:3b")
    assert parse("qwen2.5:3b", env=elsewhere).hub == "hf"
    assert parse("qwen2.5:3b", "hf", env=china).hub == "hf"  # --hub wins
    assert parse("smollm2:1.7b", "modelscope").hub == "hf"  # only Hugging Face has it
    name = parse("hf:Qwen/Qwen2.5-7B-Instruct-GGUF:q8_0")
    assert (name.hub, name.repo, name.spec, name.alias) == (
        "hf", "Qwen/Qwen2.5-7B-Instruct-GGUF", "q8_0", None)
    assert parse("modelscope:Qwen/Qwen2.5-3B-Instruct-GGUF").spec is None
    assert all(is_pullable(n) for n in ("qwen2.5:3b", "hf:a/b", "modelscope:a/b:Q4_0"))
    assert not any(is_pullable(n) for n in ("ollama:x:y", "model.gguf", None))


@pytest.mark.parametrize("bad", ["hf:Qwen", "hf:", "modelscope:/repo", "hf:a/b/c",
                                 "hf:a b/c"])
def test_a_malformed_hub_name_says_how_to_write_one(bad: str) -> None:
    with pytest.raises(InvalidInput, match="OWNER/REPO") as caught:
        parse(bad)
    assert "e.g." in caught.value.hint


def test_an_unknown_name_lists_the_aliases_and_the_forms() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse("qwen9:100b")
    assert "qwen2.5:3b" in caught.value.hint and "hf:OWNER/REPO" in caught.value.hint


def test_a_quantization_picks_its_file_and_every_shard_of_a_split_one() -> None:
    listing = files("README.md", "q-q4_k_m.gguf", "q-q8_0.gguf", "mmproj-q-f16.gguf",
                    "q-q5_k_m-00002-of-00002.gguf", "q-q5_k_m-00001-of-00002.gguf")
    assert [f.path for f in choose(listing, "Q8_0", "Hub")] == ["q-q8_0.gguf"]
    assert [f.path for f in choose(listing, None, "Hub")] == ["q-q4_k_m.gguf"]
    assert [f.path for f in choose(listing, "q5_K_M", "Hub")] == [
        "q-q5_k_m-00001-of-00002.gguf", "q-q5_k_m-00002-of-00002.gguf"]
    assert [f.path for f in choose(listing, "q-q5_k_m-00001-of-00002.gguf", "Hub")] == [
        "q-q5_k_m-00001-of-00002.gguf", "q-q5_k_m-00002-of-00002.gguf"]
    assert [f.path for f in choose(files("only.gguf"), None, "Hub")] == ["only.gguf"]


def test_what_a_repo_lacks_is_an_error_naming_what_it_has() -> None:
    listing = files("q-q4_k_m.gguf", "q-q8_0.gguf")
    with pytest.raises(UnknownName) as caught:
        choose(listing, "Q2_K", "Hub")
    assert caught.value.valid == ["q4_k_m", "q8_0"] and "Q2_K" in str(caught.value)
    with pytest.raises(UnknownName, match=r"q-q4_k_m\.gguf"):
        choose(listing, "other.gguf", "Hub")
    with pytest.raises(PullError, match="no GGUF file") as no_gguf:
        choose(files("model.safetensors", "config.json"), None, "Hub")
    assert "--engine transformers" in no_gguf.value.hint
    with pytest.raises(PullError, match="no Q4_K_M") as several:
        choose(files("a-q8_0.gguf", "a-f16.gguf"), None, "Hub")
    assert "q8_0" in several.value.hint and "f16" in several.value.hint
    with pytest.raises(PullError, match="1 of the 3 shards"):
        choose(files("a-q4_k_m-00001-of-00003.gguf"), "Q4_K_M", "Hub")


@pytest.mark.usefixtures("home")
@pytest.mark.parametrize(("variable", "name"), [
    ("HF_HUB_OFFLINE", "hf:Qwen/Qwen2.5-3B-Instruct-GGUF"),
    ("TRANSFORMERS_OFFLINE", "hf:Qwen/Qwen2.5-3B-Instruct-GGUF"),
    ("MODELSCOPE_OFFLINE", "modelscope:Qwen/Qwen2.5-3B-Instruct-GGUF"),
    ("ROLECHAT_OFFLINE", "modelscope:Qwen/Qwen2.5-3B-Instruct-GGUF"),
    ("ROLECHAT_OFFLINE", "hf:Qwen/Qwen2.5-3B-Instruct-GGUF")])
def test_offline_settings_refuse_a_pull_at_once(variable: str, name: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "1")
    # an endpoint nothing answers on: an attempt to reach it would show as a different error
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(PullError, match=f"offline here \\({variable} is set\\)") as caught:
        pull(name)
    assert time.monotonic() - started < 5
    assert "rolechat models list" in caught.value.hint


@pytest.mark.usefixtures("home")
def test_a_name_not_pulled_yet_is_not_downloaded_but_says_how() -> None:
    with pytest.raises(NotPulled) as caught:
        resolve_model("qwen2.5:3b")
    assert "rolechat pull qwen2.5:3b" in caught.value.hint and "--yes" in caught.value.hint
    with pytest.raises(NotPulled):
        resolve_model("hf:Qwen/Qwen2.5-3B-Instruct-GGUF:Q4_K_M")


def hf_cache_file(home: Path, repo: str, filename: str) -> Path:
    """``filename`` in the Hugging Face cache as huggingface_hub lays it out: a blob (a copy of
    the embedded GGUF) and a snapshot link to it."""
    folder = home / ".cache/huggingface/hub" / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(GGUF.read_bytes())
    link = folder / "snapshots" / ("f" * 40) / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(Path("../../blobs/0123abcd"))
    return link


def test_a_pulled_file_is_listed_under_its_alias_and_only_its_own_files_are_removed(
        home: Path) -> None:
    link = hf_cache_file(home, "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                         "qwen2.5-0.5b-instruct-q4_k_m.gguf")
    model = resolve_model("qwen2.5:0.5b")
    assert model.path == link and model.source == "hf"
    assert model.ref == "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf"
    assert resolve_model(model.ref) == model
    assert resolve_model("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M") == model
    assert "qwen2.5:0.5b" in {m.name for m in find_models().models}
    assert pull("qwen2.5:0.5b", "hf").path == link  # already here: nothing is fetched

    with pytest.raises(InvalidInput, match="not pulled by rolechat") as refused:
        remove("qwen2.5:0.5b")
    assert "Hugging Face cache" in refused.value.hint and link.exists()
    with pytest.raises(InvalidInput, match="not pulled by rolechat") as embedded:
        remove("smollm2:135m")
    assert "part of rolechat" in embedded.value.hint and GGUF.exists()

    record = {"name": "qwen2.5:0.5b", "hub": "hf", "paths": [str(link)], "size": 5}
    target = paths.home_dir("models") / "pulled.json"
    target.write_text(json.dumps([record]))
    blob = link.resolve()
    removed, size = remove("qwen2.5:0.5b")
    assert removed == [link, blob] and size == 5
    assert not link.exists() and not link.is_symlink() and not blob.exists()
    assert pulled() == []
    assert "qwen2.5:0.5b" not in {m.name for m in find_models().models}


def test_the_hubs_read_their_endpoints_and_caches_from_the_environment(home: Path) -> None:
    env = {"HOME": str(home), "HF_ENDPOINT": "http://127.0.0.1:1234/",
           "MODELSCOPE_ENDPOINT": "127.0.0.1:5678", "HF_HOME": "/x/hf"}
    assert hub("hf", env).endpoint == "http://127.0.0.1:1234"
    assert hub("hf", env).cache() == Path("/x/hf/hub")
    assert hub("modelscope", env).endpoint == "https://127.0.0.1:5678"
    assert hub("modelscope", env).cache() == home / ".cache/modelscope/hub"
    assert hub("hf", {"HOME": str(home)}).cache() == home / ".cache/huggingface/hub"
