"""GenerationParams: the one validated schema for how a reply is generated.

Contract: library calls, CLI flags and HTTP bodies all build a :class:`GenerationParams` through
this module, so every edge agrees on names, defaults, ranges and error wording. Construction
either succeeds with a frozen, valid object or raises :class:`~rolechat.errors.InvalidParams`
listing every bad field. Ranges follow OpenAI's (temperature 0–2). Types are strict, as in a
JSON schema: a number field refuses a bool and a string (``temperature=True``,
``max_new_tokens="4"``), an integer field refuses a float, a float field takes an int; ``stop``
takes one string or a list of strings. Limits that depend on the model (``max_new_tokens``
below the context length) are checked where the model is known (the window).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidParams

#: Largest seed accepted. llama.cpp reserves 0xFFFFFFFF for "random".
MAX_SEED = 2**32 - 2


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "params"
        if err["type"] == "extra_forbidden":
            valid = ", ".join(GenerationParams.model_fields)
            why = f"unknown parameter (valid: {valid})"
        else:
            why = f"{err['msg'].lower()} (got {err['input']!r})"
        problems.append((field, why))
    return problems


class GenerationParams(BaseModel):
    """How one reply is generated. Immutable; use :meth:`merged` to derive a variant."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False, strict=True)

    max_new_tokens: int = Field(512, gt=0, le=1_048_576,
                                description="Most tokens the reply may have.")
    temperature: float = Field(0.9, ge=0.0, le=2.0,
                               description="Sampling temperature; 0 means greedy (deterministic).")
    top_p: float = Field(0.95, gt=0.0, le=1.0,
                         description="Nucleus sampling: keep the smallest set of tokens with this "
                                     "total probability, in (0, 1].")
    top_k: int = Field(40, ge=0, le=1_000_000,
                       description="Sample only among the k most likely tokens; 0 disables.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0,
                                      description="Penalty for repeating tokens; 1 disables.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                     description="Lower a token's score by this much for every "
                                                 "time the reply used it; 0 disables.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                    description="Lower a token's score by this much once the "
                                                "reply has used it; 0 disables.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Random seed; the same seed gives the same text.")
    stop: tuple[str, ...] = Field((), max_length=16,
                                  description="Strings that end the reply (not included in it).")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidParams(_problems(exc)) from None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list) else value  # JSON and TOML give lists

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> GenerationParams:
        """Validate a plain mapping (a TOML table, a JSON body), ignoring ``None`` values."""
        return cls(**{k: v for k, v in (data or {}).items() if v is not None})

    def merged(self, **overrides: Any) -> GenerationParams:
        """A new, validated copy with ``overrides`` applied (``None`` values are ignored)."""
        data = self.model_dump(exclude_unset=True)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationParams(**data)

    def explicit(self) -> dict[str, Any]:
        """Only the fields that were set explicitly (what a persona or request asked for)."""
        return self.model_dump(exclude_unset=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def valid_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are valid GenerationParams fields and values, one by one
    (a model's stored defaults: a bad one is skipped, never an error)."""
    kept: dict[str, Any] = {}
    for name, value in values.items():
        if name in GenerationParams.model_fields and value is not None:
            try:
                kept[name] = getattr(GenerationParams(**{name: value}), name)
            except InvalidParams:
                continue
    return kept
