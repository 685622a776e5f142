"""`rolechat pull`, `--model NAME --yes` and `rolechat models rm` against a stand-in for both hubs
on loopback (tests/hubstub.py), through huggingface_hub and modelscope themselves, in a real
subprocess: the pulled file is the embedded GGUF under Qwen's repo and file names, and a chat
runs on it."""

from __future__ import annotations

import hashlib
import json
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from hubstub import HubStub, hub_env
from model_stores import GGUF, STORE_VARIABLES
from servers import free_port

REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
FILE = "qwen2.5-0.5b-instruct-q4_k_m.gguf"
SPLIT = ("split-q4_k_m-00001-of-00002.gguf", "split-q4_k_m-00002-of-00002.gguf")
SHA256 = hashlib.sha256(GGUF.read_bytes()).hexdigest()
#: Variables of this machine that would change where models are looked for or fetched from.
OUTSIDE = (*STORE_VARIABLES, "ROLECHAT_HUB", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
           "MODELSCOPE_OFFLINE", "ROLECHAT_OFFLINE", "LC_ALL", "LC_MESSAGES", "LANGUAGE")


@pytest.fixture
def hub(cli, tmp_path: Path) -> Iterator[HubStub]:
    """The stand-in hub serving Qwen's 0.5B repo (its Q4_K_M is the embedded GGUF; its Q8_0 is
    never fetched), a split GGUF and a repo of safetensors; ``cli`` pointed at it."""
    with HubStub() as stub:
        stub.add_repo(REPO, {FILE: GGUF, "qwen2.5-0.5b-instruct-q8_0.gguf": b"not fetched",
                             "README.md": b"# Qwen2.5-0.5B-Instruct-GGUF\n"})
        stub.add_repo("Owner/Split-GGUF", {SPLIT[0]: GGUF, SPLIT[1]: b"second shard" * 400})
        stub.add_repo("Owner/Weights", {"model.safetensors": b"\0" * 64, "config.json": b"{}"})
        cli.env = {**{k: v for k, v in cli.env.items() if k not in OUTSIDE},
                   "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
                   "ROLECHAT_HUB_TIMEOUT": "10",
                   **hub_env(stub, tmp_path / "cache", timeout=5, retries=1)}
        yield stub


def weights(root: Path) -> list[Path]:
    """What a hub's cache under ``root`` holds of models: GGUF files and links, blobs and
    partial downloads (not its lock files and tags)."""
    return sorted(p for p in root.rglob("*") if (p.is_file() or p.is_symlink()) and (
        p.suffix == ".gguf" or ".incomplete" in p.name or p.parent.name == "blobs"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fails(cli, *args: str, code: int, extra: dict[str, str] | None = None) -> str:
    """Run a pull that must fail (with ``extra`` variables): its one error line (the lines
    before it say what the pull was doing)."""
    saved = dict(cli.env)
    cli.env.update(extra or {})
    try:
        result = cli.run(*args)
    finally:
        cli.env = saved
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert result.code == code and result.out == "" and len(errors) == 1, result.describe()
    return errors[0]


def listed(cli) -> dict[str, dict[str, object]]:
    return {row["name"]: row for row in json.loads(cli.ok("models", "list", "--json").out)}


def test_an_alias_is_pulled_from_hugging_face_chatted_with_and_removed(
        cli, hub: HubStub, tmp_path: Path) -> None:
    pulled = cli.ok("pull", "qwen2.5:0.5b", "--hub", "hf")
    assert "Ready. Chat with it: rolechat chat --model qwen2.5:0.5b" in pulled.out
    assert f"Pulling {FILE} (0.10 GB) from Hugging Face" in " ".join(pulled.err.split())
    assert hub.ranges("q8_0") == []  # only the alias's quantization was fetched
    row = listed(cli)["qwen2.5:0.5b"]
    assert row["pulled"] is True and row["source"] == "hf" and row["quantization"] == "Q4_1"
    path = Path(str(row["path"]))
    assert path.is_relative_to(tmp_path / "cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-"
                                          "Instruct-GGUF/snapshots") and sha256(path) == SHA256
    record = json.loads((cli.home / "models/pulled.json").read_text())
    assert [(r["name"], r["hub"], r["repo"], r["files"]) for r in record] == [
        ("qwen2.5:0.5b", "hf", REPO, [FILE])]

    fetched = len(hub.requests)
    again = cli.ok("pull", "qwen2.5:0.5b", "--hub", "hf")
    assert "qwen2.5:0.5b is already here" in again.err and len(hub.requests) == fetched

    answer = cli.ask_json("--model", "qwen2.5:0.5b", *cli.FAST, "Hi")
    assert answer["response"] and Path(answer["model"]).name == FILE
    # its hub name works too, with the file or the quantization
    assert cli.ask_json("-m", f"hf:{REPO}:Q4_K_M", *cli.FAST, "Hi")["response"]

    removed = cli.ok("models", "rm", "qwen2.5:0.5b")
    assert "Removed qwen2.5:0.5b (98.4 MB)" in " ".join(removed.out.split())
    assert "qwen2.5:0.5b" not in listed(cli)
    assert weights(tmp_path / "cache/huggingface") == []
    assert "not pulled by rolechat" in cli.fails("models", "rm", "smollm2:135m", code=2)
    assert GGUF.is_file()


def test_modelscope_is_the_default_in_a_chinese_locale_and_a_chat_asks_before_pulling(
        cli, hub: HubStub, tmp_path: Path) -> None:
    cli.env["LANG"] = "zh_CN.UTF-8"
    refused = cli.fails("ask", "-m", "qwen2.5:0.5b", *cli.FAST, "你好", code=4)
    assert "not on this machine yet" in refused and "rolechat pull qwen2.5:0.5b" in refused
    assert [r for r in hub.requests if "FilePath=" in r[1] or "/resolve/" in r[1]] == []

    answer = cli.ask_json("-m", "qwen2.5:0.5b", "--yes", *cli.FAST, "你好")
    assert answer["response"]
    target = (tmp_path / "cache/modelscope/models/Qwen--Qwen2.5-0.5B-Instruct-GGUF/snapshots/"
                         f"master/{FILE}")
    assert Path(answer["model"]) == target and sha256(target) == SHA256
    assert hub.ranges(f"/api/v1/models/{REPO}/repo?") == [None]
    assert listed(cli)["qwen2.5:0.5b"]["source"] == "modelscope"
    assert cli.ok("models", "rm", "qwen2.5:0.5b") and not target.exists()


def test_a_cut_download_resumes(cli, hub: HubStub, tmp_path: Path) -> None:
    # Hugging Face: its library retries the cut body within the pull, from the last whole
    # 10 MiB chunk it had written
    hub.cut_next(f"{REPO}/{FILE}", 30_000_000)
    cli.ok("pull", f"hf:{REPO}:{FILE}")
    assert hub.ranges(f"/{REPO}/resolve/") == [None, f"bytes={2 * 10 * 1024 * 1024}-"]
    assert sha256(Path(str(listed(cli)["qwen2.5:0.5b"]["path"]))) == SHA256

    # ModelScope: a pull that gives up keeps its partial file, and the next one resumes it
    hub.cut_next(f"{REPO}/{FILE}", 25_000_000, times=2)
    stopped = fails(cli, "pull", f"modelscope:{REPO}:Q4_K_M", code=8)
    assert f"Downloading {FILE} from ModelScope" in stopped and "resumes where" in stopped
    partial = list((tmp_path / "cache/modelscope").rglob("*.incomplete"))
    assert len(partial) == 1 and partial[0].stat().st_size == 50_000_000
    cli.ok("pull", f"modelscope:{REPO}:Q4_K_M")
    assert hub.ranges("FilePath=")[-1] == "bytes=50000000-"
    model = listed(cli)[f"modelscope:{REPO}:{FILE}"]
    assert sha256(Path(str(model["path"]))) == SHA256
    assert not list((tmp_path / "cache/modelscope").rglob("*.incomplete"))


@pytest.mark.parametrize(("name", "cache"), [("hf", "huggingface"), ("modelscope", "modelscope")])
def test_a_corrupted_download_is_an_error_and_leaves_nothing_to_load(
        cli, hub: HubStub, tmp_path: Path, name: str, cache: str) -> None:
    hub.corrupt(f"{REPO}/{FILE}")
    error = fails(cli, "pull", f"{name}:{REPO}", code=8)
    assert f"{FILE} from " in error and "does not match its checksum" in error
    assert weights(tmp_path / "cache" / cache) == []
    assert not any(n.startswith(f"{name}:{REPO}") or n == "qwen2.5:0.5b" for n in listed(cli))
    assert not (cli.home / "models/pulled.json").exists()


def test_offline_and_unreachable_hubs_fail_at_once(cli, hub: HubStub) -> None:
    for variable, name in (("HF_HUB_OFFLINE", f"hf:{REPO}"),
                           ("MODELSCOPE_OFFLINE", f"modelscope:{REPO}")):
        error = fails(cli, "pull", name, "--hub", "hf", code=8, extra={variable: "1"})
        assert f"offline here ({variable} is set)" in error
    assert hub.requests == []

    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    error = fails(cli, "pull", f"hf:{REPO}", code=8, extra={"HF_ENDPOINT": closed})
    assert f"Cannot reach Hugging Face ({closed}) for {REPO}" in error
    assert "rolechat models list" in error and time.monotonic() - started < 15

    hub.hang()
    for name, title in ((f"hf:{REPO}", "Hugging Face"), (f"modelscope:{REPO}", "ModelScope")):
        started = time.monotonic()
        error = fails(cli, "pull", name, code=8, extra={"ROLECHAT_HUB_TIMEOUT": "2"})
        assert f"{title} ({hub.url}) did not answer within 2 s" in error
        assert time.monotonic() - started < 12
    # what is on disk still works with no hub at all
    assert cli.ask_json(*cli.FAST, "Hi")["response"]


def test_bad_names_and_missing_files_name_the_choices(cli, hub: HubStub) -> None:
    assert "qwen2.5:3b" in fails(cli, "pull", "qwen9:100b", code=2)
    assert "should be OWNER/REPO" in fails(cli, "pull", "hf:Qwen", code=2)
    missing = fails(cli, "pull", f"hf:{REPO}:Q2_K", code=2)
    assert "Unknown quantization" in missing and "q4_k_m, q8_0" in missing
    assert "Valid files" in fails(cli, "pull", f"modelscope:{REPO}:other.gguf", code=2)
    assert "has no GGUF file" in fails(cli, "pull", "hf:Owner/Weights", code=8)
    assert "has no GGUF file" in fails(cli, "pull", "modelscope:Owner/Weights", code=8)
    assert "has no model repo 'Nobody/Nothing'" in fails(cli, "pull", "hf:Nobody/Nothing",
                                                              code=8)
    assert "has no model repo" in fails(cli, "pull", "modelscope:Nobody/Nothing", code=8)

    # a split GGUF comes whole: every shard, listed once by its first
    cli.ok("pull", "hf:Owner/Split-GGUF")
    fetched = [path for method, path, _ in hub.requests if method == "GET"]
    assert [sum(p.endswith(f"/{shard}") for p in fetched) for shard in SPLIT] == [1, 1]
    assert f"hf:Owner/Split-GGUF:{SPLIT[0]}" in listed(cli)


def test_pull_with_no_name_lists_the_aliases_and_suggests_one(cli, hub: HubStub) -> None:
    shown = json.loads(cli.ok("pull", "--json").out)
    aliases = {a["name"]: a for a in shown["aliases"]}
    assert {"qwen2.5:0.5b", "qwen2.5:3b", "qwen2.5:7b", "llama3.2:3b",
            "smollm2:1.7b"} <= set(aliases)
    assert aliases["qwen2.5:3b"]["ram"] > aliases["qwen2.5:3b"]["download"] > 0
    assert shown["suggested"] in aliases and shown["ram"] > 0
    text = " ".join(cli.ok("pull").out.split())
    assert f"rolechat pull {shown['suggested']} suits it" in text and "Qwen Research" in text
    assert hub.requests == []


def test_at_a_terminal_the_chat_asks_before_pulling(cli, hub: HubStub) -> None:
    refused = cli.spawn("chat", "-m", "qwen2.5:0.5b", "--hub", "hf")
    refused.expect(r"qwen2\.5:0\.5b is not on this machine\. Pull it from Hugging Face, about "
                   r"0\.5 GB\? \[Y/n\]")
    refused.sendline("n")
    refused.expect("rolechat pull qwen2.5:0.5b")
    refused.expect(pexpect.EOF)
    assert [r for r in hub.requests if "/resolve/" in r[1]] == []  # nothing was fetched

    agreed = cli.spawn("chat", "-m", "qwen2.5:0.5b", "--hub", "hf", "-t", "0",
                       "--max-new-tokens", "8")
    agreed.expect(r"\[Y/n\]")
    agreed.sendline("")  # yes is the default
    agreed.expect("Pulling qwen2.5-0.5b-instruct-q4_k_m.gguf")
    agreed.expect("you ›", timeout=60)  # the chat's prompt, on the pulled model
    agreed.sendline("/exit")
    agreed.expect(pexpect.EOF)
    assert listed(cli)["qwen2.5:0.5b"]["pulled"] is True


def test_an_alias_bigger_than_this_machine_is_said_before_pulling(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import rolechat.cli.pull as pull_cli
    import rolechat.pulling

    monkeypatch.setattr(pull_cli, "total_ram", lambda: 4_000_000_000)
    monkeypatch.setattr(rolechat.pulling, "pull", lambda *a, **k: types.SimpleNamespace(
        name="qwen2.5:7b"))
    assert pull_cli.pull_now("qwen2.5:7b", None) == "qwen2.5:7b"
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: qwen2.5:7b needs about 6.5 GB of RAM to chat and this machine has " \
           "4.0 GB" in err
    assert pull_cli.pull_now("qwen2.5:1.5b", None) and capsys.readouterr().err == ""
