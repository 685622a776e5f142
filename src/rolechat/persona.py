"""Personas: a named role — a system prompt plus default generation parameters.

Contract:
- Built-ins: ``concise`` (the default), ``tutorial`` (the seed's exact Chinese prompt),
  ``expert`` (technical and scientific answers — the tutorial's role-prompting example) and
  ``support`` (a customer-service agent).
- User personas are TOML files ``<home>/personas/<name>.toml``; the file name is the persona's
  name and a user file overrides a built-in of the same name::

      description = "Answers like a pirate"
      system = "You are a pirate. Answer in pirate speak."
      [params]            # optional, any GenerationParams field
      temperature = 0.7
      [window]            # optional: memory = "summary", summary_tokens, summary_template
      memory = "summary"

- :func:`get_persona` raises :class:`~rolechat.errors.UnknownName` listing every valid name;
  a broken file raises :class:`~rolechat.errors.InvalidInput` naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .conversation import check_text
from .errors import InvalidInput, InvalidParams, RolechatError, UnknownName
from .params import GenerationParams
from .paths import home

if TYPE_CHECKING:
    from .window import Window

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The seed tutorial's system prompt, byte for byte.
TUTORIAL_SYSTEM = "你是专业的AI助手，请尽量回答简洁"
DEFAULT_PERSONA = "concise"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Persona:
    name: str
    system: str
    description: str = ""
    #: Only the explicitly set fields count: they override the library defaults.
    params: GenerationParams = field(default_factory=GenerationParams)
    source: str = "built-in"
    #: Window settings as the persona file names them (``memory``, ``summary_tokens``,
    #: ``summary_template``).
    window: dict[str, Any] = field(default_factory=dict)

    def window_for(self, given: Mapping[str, Any] | None = None,
                   base: Window | None = None) -> Window:
        """The window this persona's chats use: the settings ``given`` (a flag's, a session's
        params', named as the persona's are) over the persona's ``[window]`` over ``base``
        (a server's default)."""
        from .window import Window, window_fields

        fields = window_fields({**self.window, **(given or {})})
        return dataclasses.replace(base if base is not None else Window(), **fields)


BUILTIN: dict[str, Persona] = {
    p.name: p
    for p in (
        Persona("concise", "You are a professional AI assistant. Answer as concisely as "
                "possible.", "A concise assistant (English)."),
        Persona("tutorial", TUTORIAL_SYSTEM,
                "The tutorial's concise assistant, in Chinese, exactly as the seed writes it."),
        Persona("expert", "You are a technical and scientific expert. Answer with accurate, "
                "technical and scientific explanations: name the underlying principles, use "
                "precise terms and units, and say plainly when something is uncertain.",
                "A technical and scientific expert.", GenerationParams(temperature=0.3)),
        Persona("support", "You are a friendly customer-service agent. Greet the customer, "
                "find out what they need, answer politely in short clear steps, and offer "
                "more help at the end. Never invent order details or policies you do not "
                "know; offer to pass the question to a human colleague instead.",
                "A polite customer-service agent.", GenerationParams(temperature=0.7)),
    )
}


def persona_dir() -> Path:
    return home() / "personas"


def load_persona_file(path: Path) -> Persona:
    """Read and validate one user persona TOML file."""
    name = path.stem
    where = f"persona file {str(path)!r}"
    if not _NAME.match(name):
        raise InvalidInput(f"Bad persona name {name!r} in {where}.",
                           "Use letters, digits, '-', '_' or '.' in the file name.")
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"Cannot read {where}: {exc}.", "Fix the TOML syntax.") from None
    unknown = set(data) - {"system", "description", "params", "name", "window"}
    if unknown:
        raise InvalidInput(f"Unknown keys {sorted(unknown)} in {where}.",
                           "Use system, description, [params] and [window].")
    if "system" not in data:
        raise InvalidInput(f"The {where} has no `system` prompt.",
                           'Add a line such as: system = "You are ..."')
    system = check_text(data["system"], f"system prompt in {where}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise InvalidInput(f"`description` in {where} must be a string.", "Quote it.")
    params_table = data.get("params", {})
    if not isinstance(params_table, dict):
        raise InvalidInput(f"`params` in {where} must be a table.", "Write it as [params].")
    try:
        params = GenerationParams.from_mapping(params_table)
    except InvalidParams as exc:
        raise InvalidInput(f"{exc.message.rstrip('.')} in {where}.", exc.hint) from None
    window = data.get("window", {})
    if not isinstance(window, dict):
        raise InvalidInput(f"`window` in {where} must be a table.", "Write it as [window].")
    try:
        check_window(window)
    except RolechatError as exc:
        raise InvalidInput(f"{exc.message.rstrip('.')} in {where}.", exc.hint) from None
    return Persona(name, system, description, params, source=str(path), window=window)


#: What a persona's ``[window]`` table may set.
WINDOW_KEYS = ("memory", "summary_tokens", "summary_template")


def check_window(table: dict[str, Any]) -> None:
    """A persona's ``[window]`` table: only :data:`WINDOW_KEYS`, each valid."""
    unknown = set(table) - set(WINDOW_KEYS)
    if unknown:
        raise InvalidInput(f"Unknown [window] keys {sorted(unknown)}.",
                           f"Use {', '.join(WINDOW_KEYS)}.")
    from .window import Window, window_fields

    Window(**window_fields(table))


def load_personas() -> tuple[dict[str, Persona], dict[str, RolechatError]]:
    """All personas (built-ins, then user files over them) and the user files that failed."""
    found = dict(BUILTIN)
    broken: dict[str, RolechatError] = {}
    folder = persona_dir()
    if folder.is_dir():
        for path in sorted(folder.glob("*.toml")):
            try:
                found[path.stem] = load_persona_file(path)
            except RolechatError as exc:
                broken[path.stem] = exc
    return found, broken


def get_persona(name: str | Persona | None = None) -> Persona:
    """A persona by name (``None`` gives the default); the error lists every valid name."""
    if isinstance(name, Persona):
        return name
    name = DEFAULT_PERSONA if name is None else name
    path = persona_dir() / f"{name}.toml"
    if _NAME.match(name) and path.is_file():
        return load_persona_file(path)
    if name in BUILTIN:
        return BUILTIN[name]
    found, broken = load_personas()
    if name in broken:
        raise broken[name]
    raise UnknownName("persona", name, set(found) | set(broken))
