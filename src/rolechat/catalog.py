"""The curated models ``rolechat pull`` knows by a short name (``qwen2.5:3b``).

Contract: :data:`ALIASES` maps each alias to an :class:`Alias`: the GGUF repo on each hub
(Hugging Face ``hf`` and ModelScope ``modelscope``; a model one hub lacks names only the other),
the quantization pulled (the repo's files whose names carry it: one file, or every shard of a
split GGUF), about how large the download is, about how much RAM a chat needs (the weights plus
a 4k-token KV cache and the runtime's buffers), and the licence. Sizes are guides for choosing
and for the RAM check; the download's own size comes from the hub. :func:`suggest` picks the
largest alias that fits a machine's RAM with room to spare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GB = 1_000_000_000


@dataclass(frozen=True)
class Alias:
    """A curated model: where each hub keeps its GGUFs and what it needs."""

    name: str
    title: str
    repos: dict[str, str]
    quant: str
    download: int
    ram: int
    licence: str

    def repo_on(self, hub: str) -> tuple[str, str]:
        """``(hub, repo)``: on ``hub`` when that hub has the model, else on the one that has."""
        if hub in self.repos:
            return hub, self.repos[hub]
        other = next(iter(self.repos))
        return other, self.repos[other]


def _alias(name: str, title: str, hf: str | None, modelscope: str | None, quant: str,
           download: float, ram: float, licence: str) -> Alias:
    repos = {hub: repo for hub, repo in (("modelscope", modelscope), ("hf", hf)) if repo}
    return Alias(name, title, repos, quant, int(download * GB), int(ram * GB), licence)


#: The aliases, smallest first within a family. Qwen's own GGUF repos are on both hubs under
#: the same names; the 7B's Q4_K_M is split in two files.
ALIASES: dict[str, Alias] = {a.name: a for a in (
    _alias("qwen2.5:0.5b", "Qwen2.5 0.5B Instruct", "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
           "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "Q4_K_M", 0.49, 1.0, "Apache-2.0"),
    _alias("qwen2.5:1.5b", "Qwen2.5 1.5B Instruct", "Qwen/Qwen2.5-1.5B-Instruct-GGUF",
           "Qwen/Qwen2.5-1.5B-Instruct-GGUF", "Q4_K_M", 1.12, 2.0, "Apache-2.0"),
    _alias("qwen2.5:3b", "Qwen2.5 3B Instruct", "Qwen/Qwen2.5-3B-Instruct-GGUF",
           "Qwen/Qwen2.5-3B-Instruct-GGUF", "Q4_K_M", 2.10, 3.2, "Qwen Research License"),
    _alias("qwen2.5:7b", "Qwen2.5 7B Instruct", "Qwen/Qwen2.5-7B-Instruct-GGUF",
           "Qwen/Qwen2.5-7B-Instruct-GGUF", "Q4_K_M", 4.68, 6.5, "Apache-2.0"),
    _alias("llama3.2:3b", "Llama 3.2 3B Instruct", "unsloth/Llama-3.2-3B-Instruct-GGUF",
           "unsloth/Llama-3.2-3B-Instruct-GGUF", "Q4_K_M", 2.02, 3.2,
           "Llama 3.2 Community License"),
    _alias("smollm2:1.7b", "SmolLM2 1.7B Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF",
           None, "Q4_K_M", 1.06, 2.0, "Apache-2.0"),
)}

#: RAM left for the system and other programs when suggesting a model.
HEADROOM = 2 * GB


def suggest(total_ram: int) -> Alias:
    """The largest alias (by the RAM it needs) that leaves :data:`HEADROOM` of ``total_ram``;
    the smallest when none does. Qwen first among equals: the tutorial's family."""
    ranked = sorted(ALIASES.values(), key=lambda a: (a.ram, a.name.startswith("qwen")))
    fitting = [a for a in ranked if a.ram + HEADROOM <= total_ram]
    return fitting[-1] if fitting else ranked[0]


_QUANT = re.compile(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)(?=\.gguf$|[-_.])")


def quant_of(filename: str) -> str | None:
    """The quantization a GGUF's file name carries (``qwen2.5-3b-instruct-q4_k_m.gguf``:
    ``q4_k_m``), the last one when several tokens look like one; None when it names none."""
    found = _QUANT.findall(Path(filename).name)
    return found[-1] if found else None
