"""The stand-in hub (tests/hubstub.py) against the real huggingface_hub and modelscope clients:
listings, downloads into each library's cache layout, cut connections, corrupt bodies, missing
repos/files, a hanging hub, and the environment a subprocess needs. These tests also pin down
what each library does on those faults, which ``rolechat pull`` relies on."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub.constants
import huggingface_hub.file_download
import pytest
from huggingface_hub import HfApi, RepoFile, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubstub import (
    DEFAULT_REVISION,
    HubStub,
    hf_kwargs,
    hub_env,
    modelscope_config,
    ms_cache_dir,
)

REPO = "Owner/Name"
SINGLE = "model-q4_k_m.gguf"
SHARD1 = "big-q4_k_m-00001-of-00002.gguf"
SHARD2 = "big-q4_k_m-00002-of-00002.gguf"
ON_DISK = "disk-q4_k_m.gguf"
TEN_MIB = 10 * 1024 * 1024  # huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE

_rng = random.Random(1234)
CONTENT = {
    SINGLE: _rng.randbytes(4096),
    SHARD1: _rng.randbytes(3000),
    SHARD2: _rng.randbytes(2500),
    "README.md": b"# A fake model\n\nFor tests.\n",
}
ON_DISK_BYTES = _rng.randbytes(6000)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[HubStub]:
    disk = tmp_path / "served" / ON_DISK
    disk.parent.mkdir()
    disk.write_bytes(ON_DISK_BYTES)
    with HubStub() as hub:
        hub.add_repo(REPO, {**CONTENT, ON_DISK: disk})
        yield hub


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub read HF_HUB_OFFLINE at import; these tests must be online."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_hf_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_hub_download waits 1 s before each resume; file_download uses time only for that."""
    no_sleep = SimpleNamespace(sleep=lambda seconds: None)
    monkeypatch.setattr(huggingface_hub.file_download, "time", no_sleep)


@pytest.fixture
def ms(stub: HubStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """modelscope pointed at the stub in-process; yields its cache root."""
    import modelscope_hub._download

    # A hash mismatch is retried after 1 s, then 2 s: not worth waiting for here.
    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.0)
    with modelscope_config(stub, tmp_path / "cache"):
        yield ms_cache_dir(tmp_path / "cache")


def _all(content_path: str | Path) -> bytes:
    return Path(content_path).read_bytes()


# -- Hugging Face ----------------------------------------------------------------------------------
def test_hf_listings_carry_sizes_and_sha256(stub: HubStub) -> None:
    api = HfApi(endpoint=stub.url)
    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)
            if isinstance(e, RepoFile)}
    assert set(tree) == {*CONTENT, ON_DISK}
    for name in (SINGLE, SHARD1, SHARD2, ON_DISK):
        lfs = tree[name].lfs
        assert tree[name].size == stub.file(REPO, name).size
        assert lfs is not None and lfs.sha256 == stub.file(REPO, name).sha256
    assert tree["README.md"].lfs is None

    assert sorted(api.list_repo_files(REPO)) == sorted(tree)
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == DEFAULT_REVISION
    siblings = {s.rfilename: s for s in info.siblings or []}
    sibling_lfs = siblings[SINGLE].lfs
    assert siblings[SINGLE].size == 4096
    assert sibling_lfs is not None and sibling_lfs.sha256 == stub.file(REPO, SINGLE).sha256
    paths = api.get_paths_info(REPO, [SHARD2, "absent.gguf"])
    assert [p.path for p in paths] == [SHARD2]


def test_hf_download_lands_in_the_hf_cache_layout(stub: HubStub, tmp_path: Path) -> None:
    kwargs = hf_kwargs(stub, tmp_path)
    for name, expected in {**CONTENT, ON_DISK: ON_DISK_BYTES}.items():
        path = Path(hf_hub_download(REPO, name, **kwargs))
        snapshot = Path(kwargs["cache_dir"]) / "models--Owner--Name" / "snapshots"
        assert path == snapshot / DEFAULT_REVISION / name
        assert _all(path) == expected
    assert ("HEAD", f"/{REPO}/resolve/main/{SINGLE}", None) in stub.requests
    # Blobs are named after the ETag: sha256 for LFS files, the git blob sha1 otherwise.
    blobs = {p.name for p in (Path(kwargs["cache_dir"]) / "models--Owner--Name/blobs").iterdir()}
    assert stub.file(REPO, SINGLE).sha256 in blobs
    assert stub.file(REPO, "README.md").blob_id in blobs


def test_hf_resumes_a_cut_body_within_the_same_call(stub: HubStub, tmp_path: Path,
                                                     no_hf_sleep: None) -> None:
    # huggingface_hub only counts bytes it has handed out in whole 10 MiB chunks, so a resume
    # with a Range header needs a file over 10 MiB, cut after the first chunk.
    large = random.Random(7).randbytes(TEN_MIB + 600_000)
    stub.add_repo("Owner/Large", {"large-q4_k_m.gguf": large})
    stub.cut_next("Owner/Large/large-q4_k_m.gguf", TEN_MIB + 100_000)
    path = hf_hub_download("Owner/Large", "large-q4_k_m.gguf", **hf_kwargs(stub, tmp_path))
    assert _all(path) == large
    assert stub.ranges("/Owner/Large/resolve/") == [None, f"bytes={TEN_MIB}-"]


def test_hf_gives_up_leaving_nothing_and_the_next_call_starts_over(
        stub: HubStub, tmp_path: Path, no_hf_sleep: None) -> None:
    kwargs = hf_kwargs(stub, tmp_path)
    stub.cut_next(SHARD1, 1000)
    stub.cut_next(SHARD1, 0, times=5)  # 1 try + 5 retries without progress: it gives up
    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(REPO, SHARD1, **kwargs)
    assert len(stub.ranges(f"/resolve/main/{SHARD1}")) == 6
    repo_dir = Path(kwargs["cache_dir"]) / "models--Owner--Name"
    assert not [p for p in repo_dir.rglob("*") if p.is_file() and "blobs" in p.parts]

    stub.requests.clear()
    path = hf_hub_download(REPO, SHARD1, **kwargs)
    assert _all(path) == CONTENT[SHARD1]
    assert stub.ranges(f"/resolve/main/{SHARD1}") == [None]  # from byte 0 again


def test_hf_missing_file_repo_and_revision(stub: HubStub, tmp_path: Path) -> None:
    kwargs = hf_kwargs(stub, tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "absent.gguf", **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("Owner/Absent", SINGLE, **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, SINGLE, revision="v9", **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        list(HfApi(endpoint=stub.url).list_repo_tree("Owner/Absent"))


def test_hf_does_not_notice_a_corrupt_body(stub: HubStub, tmp_path: Path) -> None:
    stub.corrupt(f"{REPO}/{SINGLE}")
    kwargs = hf_kwargs(stub, tmp_path)
    path = hf_hub_download(REPO, SINGLE, **kwargs)
    served = _all(path)
    assert len(served) == len(CONTENT[SINGLE]) and served != CONTENT[SINGLE]
    report = HfApi(endpoint=stub.url).verify_repo_checksums(REPO, cache_dir=kwargs["cache_dir"])
    assert [m["path"] for m in report.mismatches] == [SINGLE]


# -- ModelScope ------------------------------------------------------------------------------------
def test_ms_listings(stub: HubStub, ms: Path) -> None:
    from modelscope.hub.api import HubApi

    api = HubApi(endpoint=stub.url)
    listed = {f["Path"]: f for f in api.get_model_files(REPO, revision="master", recursive=True)}
    assert {p: f["Size"] for p, f in listed.items()} == {
        **{p: len(b) for p, b in CONTENT.items()}, ON_DISK: len(ON_DISK_BYTES)}
    # get_model_files drops Sha256; the modelscope_hub listing keeps it.
    infos = {f.path: f for f in api.list_repo_files(REPO, "model", revision="master")}
    assert infos[SHARD1].sha256 == stub.file(REPO, SHARD1).sha256
    assert infos[ON_DISK].size == len(ON_DISK_BYTES)


def test_ms_download_lands_in_the_modelscope_cache(stub: HubStub, ms: Path) -> None:
    from modelscope.hub.file_download import model_file_download

    for name in (SINGLE, "README.md", ON_DISK):
        path = Path(model_file_download(REPO, name))
        assert path == ms / "models" / "Owner--Name" / "snapshots" / "master" / name
        assert _all(path) == (ON_DISK_BYTES if name == ON_DISK else CONTENT[name])
    assert ("GET", f"/api/v1/models/{REPO}/revisions", None) in stub.requests


def test_ms_resumes_a_cut_body_within_the_same_call(stub: HubStub, ms: Path) -> None:
    from modelscope.hub.file_download import model_file_download

    stub.cut_next(SHARD1, 1234)
    assert _all(model_file_download(REPO, SHARD1)) == CONTENT[SHARD1]
    assert stub.ranges(f"FilePath={SHARD1}") == [None, "bytes=1234-"]


def test_ms_keeps_the_partial_file_and_the_next_call_resumes(
        stub: HubStub, ms: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelscope_hub._download
    from modelscope.hub.file_download import model_file_download
    from modelscope_hub.errors import NetworkError

    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_RETRY_TIMES", 0)
    stub.cut_next(SHARD2, 900)
    with pytest.raises(NetworkError):
        model_file_download(REPO, SHARD2)
    target = ms / "models" / "Owner--Name" / "snapshots" / "master" / SHARD2
    partial = target.with_name(SHARD2 + ".incomplete")
    assert not target.exists() and partial.stat().st_size == 900

    assert _all(model_file_download(REPO, SHARD2)) == CONTENT[SHARD2]
    assert stub.ranges(f"FilePath={SHARD2}") == [None, "bytes=900-"]
    assert not partial.exists()


def test_ms_rejects_a_corrupt_body_and_leaves_nothing(stub: HubStub, ms: Path) -> None:
    from modelscope.hub.file_download import model_file_download
    from modelscope_hub.errors import FileIntegrityError

    stub.corrupt(SINGLE)
    with pytest.raises(FileIntegrityError):
        model_file_download(REPO, SINGLE)
    assert len(stub.ranges(f"FilePath={SINGLE}")) == 3  # tried three times
    snapshot = ms / "models" / "Owner--Name" / "snapshots" / "master"
    assert not [p for p in snapshot.rglob("*") if p.is_file()]


def test_ms_missing_file_and_repo(stub: HubStub, ms: Path) -> None:
    import requests
    from modelscope.hub.api import HubApi
    from modelscope.hub.file_download import model_file_download
    from modelscope_hub.errors import NotExistError

    with pytest.raises(requests.HTTPError):
        model_file_download(REPO, "absent.gguf")
    with pytest.raises(requests.HTTPError):
        model_file_download("Owner/Absent", SINGLE)
    with pytest.raises(NotExistError):
        HubApi(endpoint=stub.url).get_model_files("Owner/Absent")


# -- the stub itself and the environment -----------------------------------------------------------
def test_unknown_endpoints_are_logged_404s(stub: HubStub) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{stub.url}/api/datasets/{REPO}", timeout=5)
    assert caught.value.code == 404
    assert stub.requests[-1] == ("GET", f"/api/datasets/{REPO}", None)


def test_a_hanging_hub_times_clients_out_and_still_closes(tmp_path: Path) -> None:
    hub = HubStub().start()
    hub.add_repo(REPO, CONTENT)
    hub.hang()
    with pytest.raises(httpx2.TimeoutException):
        HfApi(endpoint=hub.url).model_info(REPO, timeout=0.5)
    assert hub.requests == [("GET", f"/api/models/{REPO}", None)]
    started = time.monotonic()
    hub.close()
    assert time.monotonic() - started < 3


_CHILD = """
import json, sys
from huggingface_hub import HfApi, RepoFile, hf_hub_download
from modelscope.hub.api import HubApi
from modelscope.hub.file_download import model_file_download
repo, name = sys.argv[1], sys.argv[2]
print(json.dumps({
    "hf_files": sorted(HfApi().list_repo_files(repo)),
    "hf": hf_hub_download(repo, name),
    "ms_files": sorted(f["Path"] for f in HubApi().get_model_files(repo)),
    "ms": model_file_download(repo, name),
}))
"""


def test_hub_env_points_a_subprocess_at_the_stub(stub: HubStub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = os.environ | hub_env(stub, cache, timeout=5, retries=1)
    done = subprocess.run([sys.executable, "-c", _CHILD, REPO, SHARD2], env=env, check=True,
                          capture_output=True, text=True, timeout=60)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = sorted([*CONTENT, ON_DISK])
    assert out["hf_files"] == expected and out["ms_files"] == expected
    assert Path(out["hf"]).is_relative_to(cache / "huggingface" / "hub")
    assert Path(out["ms"]) == cache / "modelscope/models/Owner--Name/snapshots/master" / SHARD2
    assert _all(out["hf"]) == _all(out["ms"]) == CONTENT[SHARD2]
    # modelscope's config dir (it writes an install id there) went under the cache root too.
    assert (cache / "modelscope-home" / "credentials" / "session").is_file()
