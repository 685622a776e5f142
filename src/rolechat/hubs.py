"""The two model hubs rolechat pulls from, through their own client libraries.

Contract:
- :class:`HuggingFace` (``huggingface_hub``) and :class:`ModelScope` (``modelscope``) each list a
  repo's files with their sizes and SHA-256 (:meth:`Hub.listing`) and download one file into the
  hub's own cache (:meth:`Hub.download`), where other tools find it too. The libraries resume a
  download that stopped (a second pull picks up the partial file), show their progress bars,
  and honour their endpoints (``HF_ENDPOINT``; ``MODELSCOPE_ENDPOINT``), proxies
  and tokens. Both read those settings from the environment each time rolechat calls them.
- A downloaded file is checked against the SHA-256 the hub lists. ModelScope checks it itself;
  for Hugging Face rolechat does, and a file that does not match is removed from the cache
  (blob and link) before :class:`~rolechat.errors.PullError` says so: no half or wrong file is
  ever left where a chat would load it.
- Offline is a normal state: with ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set,
  Hugging Face refuses at once; so does ModelScope with ``MODELSCOPE_OFFLINE`` (its library
  has no switch of its own, only a per-call ``local_files_only``), and both with
  ``ROLECHAT_OFFLINE``. An unreachable or silent
  hub fails within :func:`timeout` seconds (``ROLECHAT_HUB_TIMEOUT``, default 15) for the
  listing. Every failure is a PullError naming the hub, the repo and what to do.
- :func:`default_hub` is ``$ROLECHAT_HUB`` when set, else ModelScope where the locale is
  mainland Chinese (``zh_CN``, ``zh_Hans``: Hugging Face is hard to reach there, and the
  tutorial uses ModelScope), else Hugging Face.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import PullError

HUB_NAMES = {"hf": "Hugging Face", "modelscope": "ModelScope"}
_T = TypeVar("_T")


@dataclass(frozen=True)
class RemoteFile:
    """A file in a hub's repo: its path there, size and SHA-256 (None: the hub gave none)."""

    path: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class Listing:
    """A repo's files at one revision (a commit id where the hub gives one)."""

    repo: str
    revision: str | None
    files: list[RemoteFile]


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def timeout(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    try:
        return max(0.5, float(env.get("ROLECHAT_HUB_TIMEOUT") or 15))
    except ValueError:
        return 15.0


def default_hub(env: Mapping[str, str] | None = None) -> str:
    """The hub to pull from when the user names none (see the module's contract)."""
    env = os.environ if env is None else env
    chosen = (env.get("ROLECHAT_HUB") or "").strip().lower()
    if chosen in ("huggingface", "hf"):
        return "hf"
    if chosen == "modelscope":
        return "modelscope"
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE"):
        value = (env.get(variable) or "").replace("-", "_").lower()
        if value:
            return "modelscope" if value.startswith(("zh_cn", "zh_hans", "zh_sg")) else "hf"
    return "hf"


def _bounded(seconds: float, call: Callable[[], _T], what: str) -> _T:
    """``call()``, or a PullError when it has not answered within ``seconds``. It runs on a
    daemon thread, left to the library's own timeouts: neither the pull nor the process's exit
    waits for it."""
    results: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def run() -> None:
        try:
            results.put((True, call()))
        except BaseException as exc:  # handed to the caller's thread
            results.put((False, exc))

    threading.Thread(target=run, name="rolechat-hub", daemon=True).start()
    try:
        ok, value = results.get(timeout=seconds)
    except queue.Empty:
        raise PullError(f"{what} did not answer within {seconds:g} s.",
                        "Check the network (or the hub's endpoint setting). Models already on "
                        "this machine work offline: rolechat models list.") from None
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Hub:
    """One hub: ``name`` (``hf``, ``modelscope``); see the module's contract."""

    name = ""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env

    @property
    def title(self) -> str:
        return HUB_NAMES[self.name]

    def offline(self) -> str | None:
        """The variable that puts this hub offline, when it is set."""
        raise NotImplementedError

    def check_online(self) -> None:
        variable = self.offline()
        if variable:
            raise PullError(f"{self.title} is offline here ({variable} is set): nothing can be "
                            "downloaded.", "Unset it to pull, or use a model already on this "
                            "machine: rolechat models list.")

    def listing(self, repo: str, revision: str | None = None) -> Listing:
        return _bounded(timeout(self.env), lambda: self._listing(repo, revision),
                        f"{self.title} ({self.endpoint})")

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def cache(self) -> Path:
        """The hub's own cache folder (as its library and other tools find it)."""
        raise NotImplementedError

    def _listing(self, repo: str, revision: str | None) -> Listing:
        raise NotImplementedError

    def download(self, repo: str, file: RemoteFile, revision: str | None) -> Path:
        raise NotImplementedError

    def unreachable(self, repo: str, exc: BaseException) -> PullError:
        return PullError(f"Cannot reach {self.title} ({self.endpoint}) for {repo}: {exc}.",
                         "Check the network, a proxy or the endpoint setting. Models already "
                         "on this machine work offline: rolechat models list.")

    def stopped(self, file: RemoteFile, exc: BaseException, resumes: bool) -> PullError:
        again = ("Run the same pull again: it resumes where this one stopped." if resumes else
                 "Run the same pull again (this hub's library starts the file over).")
        return PullError(f"Downloading {file.path} from {self.title} ({self.endpoint}) "
                         f"stopped: {type(exc).__name__}: {exc}.", again)

    def not_found(self, repo: str) -> PullError:
        return PullError(f"{self.title} has no model repo {repo!r}.",
                         "Check the name (OWNER/REPO, as on the hub's page), or try the other "
                         "hub with --hub.")


class HuggingFace(Hub):
    name = "hf"

    @property
    def endpoint(self) -> str:
        return (self.env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")

    def cache(self) -> Path:
        if self.env.get("HF_HUB_CACHE"):
            return Path(self.env["HF_HUB_CACHE"]).expanduser()
        if self.env.get("HF_HOME"):
            return Path(self.env["HF_HOME"]).expanduser() / "hub"
        home = Path(self.env.get("HOME") or Path.home())
        return home / ".cache" / "huggingface" / "hub"

    def offline(self) -> str | None:
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ROLECHAT_OFFLINE"):
            if _true(self.env.get(variable)):
                return variable
        return None

    def _listing(self, repo: str, revision: str | None) -> Listing:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = HfApi(endpoint=self.endpoint).model_info(
                repo, revision=revision, files_metadata=True, timeout=timeout(self.env))
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise self.not_found(repo) from None
        except Exception as exc:  # network and HTTP errors of every kind
            raise self.unreachable(repo, exc) from None
        files = [RemoteFile(s.rfilename, int(s.size or (s.lfs.size if s.lfs else 0)),
                            s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]
        return Listing(repo, info.sha, files)

    def download(self, repo: str, file: RemoteFile, revision: str | None) -> Path:
        self.check_online()
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo, file.path, revision=revision,
                                        endpoint=self.endpoint, cache_dir=self.cache(),
                                        etag_timeout=timeout(self.env)))
        except Exception as exc:  # within the call, the library resumed a cut body already
            raise self.stopped(file, exc, resumes=False) from None
        if file.sha256 and sha256_of(path) != file.sha256:
            self._discard(path)
            raise PullError(f"{file.path} from {self.title} does not match its checksum "
                            f"(SHA-256 {file.sha256[:12]}…); the file was removed.",
                            "Run the pull again; if it fails the same way, the hub or a proxy "
                            "is serving a damaged file.")
        return path

    @staticmethod
    def _discard(link: Path) -> None:
        """Remove a cached file: the snapshot's link and the blob it points to."""
        blob = link.resolve()
        for path in (link, blob):
            path.unlink(missing_ok=True)


class ModelScope(Hub):
    name = "modelscope"

    @property
    def endpoint(self) -> str:
        """``MODELSCOPE_ENDPOINT``, else the older ``MODELSCOPE_DOMAIN``, as the library reads
        them."""
        given = (self.env.get("MODELSCOPE_ENDPOINT") or self.env.get("MODELSCOPE_DOMAIN")
                 or "").strip() or "www.modelscope.cn"
        return (given if "://" in given else f"https://{given}").rstrip("/")

    def cache(self) -> Path:
        if self.env.get("MODELSCOPE_CACHE"):
            return Path(self.env["MODELSCOPE_CACHE"]).expanduser()
        home = Path(self.env.get("HOME") or Path.home())
        return home / ".cache" / "modelscope" / "hub"

    def offline(self) -> str | None:
        for variable in ("MODELSCOPE_OFFLINE", "ROLECHAT_OFFLINE"):
            if _true(self.env.get(variable)):
                return variable
        return None

    def _api(self) -> Any:
        from modelscope.hub.api import HubApi

        return HubApi(endpoint=self.endpoint)

    def _listing(self, repo: str, revision: str | None) -> Listing:
        revision = revision or "master"
        try:  # list_repo_files gives each file's SHA-256 (get_model_files does not)
            entries = self._api().list_repo_files(repo, "model", revision=revision)
        except Exception as exc:
            text = f"{type(exc).__name__} {exc}".lower()
            if "404" in text or "notexist" in text or "not exist" in text \
                    or "not found" in text:
                raise self.not_found(repo) from None
            raise self.unreachable(repo, exc) from None
        files = [RemoteFile(e.path, int(e.size or 0), e.sha256 or None)
                 for e in entries if e.type != "tree"]
        return Listing(repo, revision, files)

    def download(self, repo: str, file: RemoteFile, revision: str | None) -> Path:
        """Through ``model_file_download``, which resumes a partial file (``.incomplete``) and
        checks the body's SHA-256 itself, leaving nothing behind when it does not match."""
        self.check_online()
        from modelscope.hub.file_download import model_file_download

        try:
            return Path(model_file_download(repo, file.path, revision=revision or "master",
                                            cache_dir=str(self.cache()),
                                            endpoint=self.endpoint))
        except Exception as exc:
            if "integrity" in type(exc).__name__.lower() or "sha256" in str(exc).lower():
                raise PullError(f"{file.path} from ModelScope does not match its checksum: "
                                f"{exc}.", "Run the pull again; if it fails the same way, the "
                                "hub or a proxy is serving a damaged file.") from None
            raise self.stopped(file, exc, resumes=True) from None


HUBS: dict[str, type[Hub]] = {"hf": HuggingFace, "modelscope": ModelScope}


def hub(name: str, env: Mapping[str, str] | None = None) -> Hub:
    return HUBS[name](env)
