"""Typed errors for every way a rolechat call can go wrong.

Contract: the library raises only subclasses of :class:`RolechatError`. Each one carries the
numbers or names that matter as attributes (never only inside the message text) and a message
that says what was wrong *and what to do about it*. The CLI and server translate these into an
exit code or an HTTP error at the edge; nothing inspects message text.
"""

from __future__ import annotations

from collections.abc import Iterable


class RolechatError(Exception):
    """Base class. ``message`` says what went wrong, ``hint`` what to do about it."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}".strip() if hint else message)


class InvalidInput(RolechatError, ValueError):
    """A message, history or conversation has the wrong shape or content."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "", *, field: str = "") -> None:
        self.field = field
        super().__init__(message, hint)


class InvalidParams(RolechatError, ValueError):
    """A generation parameter (or another option: ``what`` says which kind) is unknown or out
    of range."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]], *,
                 what: str = "generation parameters") -> None:
        #: ``[(field, what is wrong), ...]``
        self.problems = problems
        text = "; ".join(f"{field}: {why}" for field, why in problems)
        super().__init__(f"Invalid {what}: {text}.", "Fix the value and try again.")


class ContextOverflow(RolechatError):
    """The prompt cannot fit in the model's context, even with every older turn dropped."""

    exit_code = 3

    def __init__(self, *, prompt_tokens: int, available_tokens: int, context_length: int,
                 max_new_tokens: int, pinned: Iterable[int] = ()) -> None:
        self.prompt_tokens = prompt_tokens
        self.available_tokens = available_tokens
        self.context_length = context_length
        self.max_new_tokens = max_new_tokens
        #: Pinned turns (from 0) that are part of the prompt that does not fit.
        self.pinned = list(pinned)
        if self.pinned:
            names = ", ".join(str(p + 1) for p in self.pinned)
            super().__init__(
                f"The prompt needs {prompt_tokens} tokens with the pinned turn(s) {names}, but "
                f"only {available_tokens} are available (context length {context_length} - "
                f"max_new_tokens {max_new_tokens}).",
                "Unpin a turn (/unpin N), shorten the message, or lower max_new_tokens.")
            return
        super().__init__(
            f"The prompt needs {prompt_tokens} tokens but only {available_tokens} are available "
            f"(context length {context_length} - max_new_tokens {max_new_tokens}).",
            "Shorten the message or the system prompt, lower max_new_tokens, "
            "or use a larger context length.",
        )


class UnknownName(RolechatError, KeyError):
    """A registry lookup missed; the error lists every valid name."""

    exit_code = 2

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(
            f"Unknown {kind} {name!r}.", f"Valid {kind}s: {', '.join(self.valid) or '(none)'}."
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class ModelLoadError(RolechatError):
    """A model path does not exist, is not a model, or the model failed to load."""

    exit_code = 4

    def __init__(self, path: str, reason: str, hint: str = "") -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"Cannot load model {path!r}: {reason}.", hint)


class EngineError(RolechatError):
    """A remote engine (an OpenAI-compatible server) failed: unreachable, refused the request
    or broke off mid-reply. ``url`` is the server, ``status`` the HTTP status (None when the
    server never answered)."""

    exit_code = 5

    def __init__(self, url: str, reason: str, hint: str = "", *,
                 status: int | None = None) -> None:
        self.url = url
        self.reason = reason
        self.status = status
        super().__init__(f"Server {url}: {reason}.", hint)


class StoreError(RolechatError):
    """The conversation store cannot do what was asked (missing id, locked or unreadable)."""

    exit_code = 6

    def __init__(self, path: str, reason: str, hint: str = "", *, missing: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.missing = missing
        if missing:
            self.exit_code = 2
        super().__init__(f"Conversation store {path!r}: {reason}.",
                         hint or "Check that the file is readable and writable and that no other "
                                 "program holds it locked.")


class ConversationChanged(RolechatError):
    """A stale view: an action (undo, retry, continue, an edit) named a turn, or a version, of
    a conversation that has changed since: another window, tab or process wrote to it. Nothing
    was changed. ``turn`` is the turn the action named (None: it named none), ``last`` the
    conversation's last turn now (None: it has none); ``version``/``current`` the version the
    action named and the stored one (None where no version was named)."""

    exit_code = 7

    def __init__(self, cid: int, *, turn: int | None = None, last: int | None = None,
                 version: int | None = None, current: int | None = None) -> None:
        self.cid, self.turn, self.last = cid, turn, last
        self.version, self.current = version, current
        if version is not None and version != current:
            why = f"it is at version {current}, not {version}"
        elif turn is None:
            why = f"it has a turn this view has not shown (its last turn is now {last})"
        else:
            now = f"its last turn is now {last}" if last is not None else "it has no turns now"
            why = f"turn {turn} is not its last turn any more ({now})"
        super().__init__(
            f"Conversation {cid} changed in another window or client: {why}. Nothing was "
            "changed.", "Load the conversation again to see it, then act on the turn you see.")


class PullError(RolechatError):
    """A model could not be pulled: the hub is unreachable or offline, the repo or file is not
    there, or the download was damaged. Nothing half-downloaded is left where a chat loads it."""

    exit_code = 8


class NotPulled(RolechatError):
    """A model named by an alias or a hub name (``qwen2.5:3b``, ``hf:OWNER/REPO:Q4_K_M``) is not
    on this machine yet: nothing is downloaded without the user asking."""

    exit_code = 4

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Model {name!r} is not on this machine yet.",
                         f"Pull it first: rolechat pull {name} (or add --yes to pull it now). "
                         "Models already here: rolechat models list.")
