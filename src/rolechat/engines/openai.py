"""A remote OpenAI-compatible server as an engine (vLLM, SGLang, Ollama, llama.cpp server, ...).

Contract:
- ``OpenAIEngine(model, base_url=..., api_key=..., tokenizer=..., context_length=...)``
  (``load_engine(model, engine="openai", base_url=...)``; CLI ``--engine openai --base-url URL
  --model NAME``). Loading asks the server for ``GET /models``: an unreachable server, a
  rejected API key or a model the server does not list fail *here*, as
  :class:`~rolechat.errors.ModelLoadError` with a hint. With no ``model`` and exactly one model
  served, that one is used.
- The engine sends the *messages* to ``POST /chat/completions`` (``stream=True``); the server
  applies its own chat template. There are no local prompt ids and no local KV cache: the
  server keeps its own prefix cache.
- Parameters: ``max_new_tokens`` → ``max_tokens`` (capped by the room the context leaves),
  ``temperature``, ``top_p``, ``seed``, ``stop`` as in the OpenAI API; ``top_k`` and
  ``repetition_penalty`` go in the request body (``extra_body``) as vLLM/SGLang/llama.cpp
  name them, only when they differ from rolechat's defaults (the OpenAI API itself rejects
  them), so by default the server's own top-k applies.
  Stop strings are sent to the server *and* enforced here (:class:`ReplyText`), so no part of
  a stop string is ever shown.
- Usage: ``prompt_tokens``/``generated_tokens`` come from the server's ``usage`` (asked for
  with ``stream_options.include_usage``); ``cached_tokens`` from
  ``usage.prompt_tokens_details.cached_tokens`` when reported, else 0. A server that sends no
  usage (llama-cpp-python's) gets rolechat's own prompt count and one token per streamed
  chunk. Timings are measured here: ``ttft_s`` to the first content chunk (network included),
  ``tokens_per_s = (generated - 1) / (last chunk - first chunk)``.
- Token counting (the sliding window needs it):

  * with ``tokenizer=`` — a ``.gguf`` file (loaded vocabulary-only through llama.cpp) or a
    Hugging Face tokenizer folder — counts are exact: the model's chat template is rendered
    and tokenized here exactly as the local engines do (``chat_template=`` overrides it);
  * without one, counts are a **safe estimate** (:func:`estimate_tokens`): per message,
    one token per 3 bytes of ASCII letters/spaces, one per digit, ASCII punctuation mark and
    non-ASCII byte, plus 8 for the role header; plus 8 for the generation prompt; plus
    :data:`ESTIMATE_TEMPLATE` (48) once for text the server's template may add on its own
    (a default system prompt, a date line); and the total times :data:`ESTIMATE_MARGIN`
    (1.15). Once the server has reported ``usage.prompt_tokens`` for a prompt, the estimate is
    scaled by the largest reported/estimated ratio seen so far (at most 1): the window then
    works from the server's own counts, still with the 15 % margin, and tightens from ~1.8x
    towards ~1.15x the real count for English. Estimated counts are marked as such
    (``exact_counts`` is False, ``Usage.estimated`` when the server reported no usage).

- The context length is ``context_length=`` if given, else what ``/models`` reports
  (vLLM/SGLang ``max_model_len``, llama.cpp server ``meta.n_ctx_train``, ``context_length``),
  else :data:`DEFAULT_CONTEXT` (4096) — :meth:`describe` says which (``context_source``).
  Pass the server's real context when it is not reported.
- Errors map on exception classes and HTTP status, never on message text: connection
  failure, 401/403, 404 (lists the served models) and 400 "context length exceeded" (the
  OpenAI error ``code``) become :class:`~rolechat.errors.EngineError` /
  :class:`~rolechat.errors.ModelLoadError` with a hint; a prompt that does not fit by rolechat's
  own count raises :class:`~rolechat.errors.ContextOverflow` before anything is sent.
- One reply at a time per engine (the base class's lock), released when the stream ends or is
  closed; closing a stream closes the HTTP response.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constraint import Constraint
from ..conversation import Message
from ..errors import EngineError, ModelLoadError
from ..params import GenerationParams
from ..streaming import ReplyText
from ..template import ChatTemplate, read_template_option
from ..toolcalls import call_block
from .base import Completion, Engine, FinishReason, Generation, Timer, reply_room
from .tokenizers import PromptEncoder, Tokenizer, load_tokenizer, template_for

if TYPE_CHECKING:
    import openai


#: Context length used when neither ``context_length=`` nor the server says.
DEFAULT_CONTEXT = 4096
#: Estimated counts are multiplied by this (see the module docstring).
ESTIMATE_MARGIN = 1.15
#: Tokens added per message (role header and end marker) and for the generation prompt.
ESTIMATE_PER_MESSAGE = 8
#: Tokens added once per prompt for text a template writes by itself (default system prompts).
ESTIMATE_TEMPLATE = 48
#: Shown by ``render`` when there is no local tokenizer: the server uses its own template.
_DISPLAY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% endif %}")
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_NO_KEY = "not-needed"


def estimate_tokens(text: str) -> int:
    """An over-estimate of the tokens of ``text`` for common BPE tokenizers (no margin):
    ASCII letters and whitespace at 3 bytes per token, every digit, ASCII punctuation mark
    and non-ASCII byte as a token of its own."""
    plain = special = 0
    for char in text:
        if char.isascii():
            if char.isdigit() or char in _PUNCTUATION:
                special += 1
            else:
                plain += 1
        else:
            special += len(char.encode("utf-8"))
    return math.ceil(plain / 3) + special


def _served_models(client: openai.OpenAI) -> list[Any]:
    return list(client.models.list().data)


def _context_of(entry: Any) -> int | None:
    """The context length a ``/models`` entry reports, if any."""
    extra: dict[str, Any] = dict(getattr(entry, "model_extra", None) or {})
    meta = extra.get("meta") if isinstance(extra.get("meta"), dict) else {}
    for value in (extra.get("max_model_len"), extra.get("context_length"),
                  extra.get("max_context_length"), (meta or {}).get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            return value
    return None


class OpenAIEngine(Engine):
    kind = "openai"

    def __init__(self, model: str | None = None, *, base_url: str, api_key: str | None = None,
                 tokenizer: str | Path | None = None, context_length: int | None = None,
                 chat_template: str | None = None, timeout: float = 600.0,
                 max_retries: int = 1) -> None:
        self._lock = threading.Lock()
        #: Exact counting through a local tokenizer (None: the estimate).
        self.encoder: PromptEncoder | None = None
        self._tokenizer: Tokenizer | None = None
        try:
            import openai
        except ImportError:
            raise ModelLoadError(str(model), "the openai package is not installed",
                                 "pip install 'rolechat[remote]'") from None
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        key = api_key or os.environ.get("OPENAI_API_KEY") or _NO_KEY
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout,
                                    max_retries=max_retries)
        probe = self.client.with_options(timeout=min(timeout, 15.0), max_retries=0)
        what = model or self.base_url
        try:
            served = _served_models(probe)
        except openai.APIConnectionError:
            raise ModelLoadError(what, f"cannot connect to the server at {self.base_url}",
                                 "Is the server running? Check --base-url (it usually ends "
                                 "in /v1).") from None
        except openai.AuthenticationError:
            raise ModelLoadError(what, f"the server at {self.base_url} rejected the API key",
                                 "Pass --api-key (or set OPENAI_API_KEY).") from None
        except openai.PermissionDeniedError:
            raise ModelLoadError(what, f"the server at {self.base_url} denied access",
                                 "Check the API key's permissions (--api-key).") from None
        except openai.NotFoundError:
            served = []  # no /models route: trust the name, learn nothing
        except openai.APIStatusError as exc:
            raise ModelLoadError(what, f"the server at {self.base_url} answered HTTP "
                                 f"{exc.status_code} to GET /models",
                                 "Check --base-url (it usually ends in /v1).") from None
        self.served_models = [str(entry.id) for entry in served]
        entry = self._pick(model, served)
        self.model = str(entry.id) if entry is not None else str(model)
        if context_length is not None:
            self.context_length, self.context_source = int(context_length), "option"
        elif entry is not None and (reported := _context_of(entry)) is not None:
            self.context_length, self.context_source = reported, "server"
        else:
            self.context_length, self.context_source = DEFAULT_CONTEXT, "default"
        if self.context_length < 16:
            raise ModelLoadError(self.model, f"context length {self.context_length} is too "
                                 "small", "Use at least a few hundred tokens.")
        self.tokenizer_path = Path(tokenizer).expanduser() if tokenizer is not None else None
        #: Scale on the raw estimate, learnt from the server's reported usage (1: none yet).
        self.calibration = 1.0
        self._ratios: list[float] = []
        if self.tokenizer_path is not None:
            self._load_tokenizer(self.tokenizer_path, chat_template)
        else:
            self.template = ChatTemplate(read_template_option(chat_template)
                                         or _DISPLAY_TEMPLATE)

    def _pick(self, model: str | None, served: list[Any]) -> Any:
        """The ``/models`` entry for ``model`` (None when the server lists none)."""
        if not served:
            if model is None:
                raise ModelLoadError(self.base_url, "no model was named and the server lists "
                                     "none", "Pass --model NAME.")
            return None
        names = ", ".join(str(e.id) for e in served)
        if model is None:
            if len(served) == 1:
                return served[0]
            raise ModelLoadError(self.base_url, "the server serves several models",
                                 f"Pass --model with one of: {names}.")
        for candidate in (model, f"{model}:latest"):  # Ollama lists "name:latest"
            for entry in served:
                if str(entry.id) == candidate:
                    return entry
        raise ModelLoadError(model, f"the server at {self.base_url} does not serve it",
                             f"Models it serves: {names}.")

    def _load_tokenizer(self, path: Path, chat_template: str | None) -> None:
        tokenizer = load_tokenizer(path)
        source = read_template_option(chat_template) or tokenizer.template_source
        self._require_template(source, path)
        self.template = template_for(tokenizer, source)
        self.encoder = PromptEncoder(tokenizer, self.template)
        self._tokenizer = tokenizer

    @staticmethod
    def _require_template(source: str, path: Path) -> None:
        if not source:
            raise ModelLoadError(str(path), "its tokenizer has no chat template",
                                 "Pass --chat-template, or a tokenizer with a template.")

    # ----- tokens ------------------------------------------------------------------------
    @property
    def exact_counts(self) -> bool:  # type: ignore[override]
        """True when a local tokenizer counts tokens exactly; False for the estimate."""
        return self.encoder is not None

    def count_text(self, text: str) -> int:
        if self.encoder is not None:
            return self.encoder.count_text(text)
        return math.ceil(estimate_tokens(text) * self.calibration * ESTIMATE_MARGIN)

    def count_tokens(self, messages: Sequence[Message], *,
                     add_generation_prompt: bool = True) -> int:
        if self.encoder is not None:
            return len(self.encoder.ids(messages, add_generation_prompt=add_generation_prompt))
        return math.ceil(self._raw_estimate(messages, add_generation_prompt) * self.calibration
                         * ESTIMATE_MARGIN)

    def _raw_estimate(self, messages: Sequence[Message], add_generation_prompt: bool) -> int:
        raw = sum(estimate_tokens(m.content) + ESTIMATE_PER_MESSAGE for m in messages)
        return raw + ESTIMATE_TEMPLATE + (ESTIMATE_PER_MESSAGE if add_generation_prompt else 0)

    def _calibrate(self, messages: Sequence[Message], reported_prompt_tokens: int) -> None:
        """Learn from the server's reported usage how far the raw estimate over-counts: the
        scale is the largest reported/estimated ratio seen so far (never above 1, so the
        estimate only ever tightens towards what the server really counted)."""
        raw = self._raw_estimate(messages, True)
        ratio = min(1.0, reported_prompt_tokens / raw) if raw > 0 else 1.0
        self._ratios.append(ratio)
        self.calibration = max(self._ratios)

    # ----- generation --------------------------------------------------------------------
    def stream(self, messages: Sequence[Message], params: GenerationParams, *,
               prompt_ids: Sequence[int] | None = None,
               cache_key: str | None = None,
               constraint: Constraint | None = None) -> Generation:
        """Send ``messages`` to the server and stream its reply (the server applies its own
        template and keeps its own prefix cache: ``prompt_ids`` and ``cache_key`` are not
        used; a ``constraint`` goes as its OpenAI fields, and the server applies it)."""
        return Generation(self._locked(list(messages), params, constraint))

    def _locked(self, messages: list[Message], params: GenerationParams,
                constraint: Constraint | None) -> Generator[str, None, Completion]:
        with self._lock:
            return (yield from self._remote(messages, params, constraint))

    def request(self, messages: Sequence[Message], params: GenerationParams,
                max_tokens: int, constraint: Constraint | None = None) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` for one reply."""
        body: dict[str, Any] = {
            "model": self.model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [m.to_openai() for m in messages
                         if not (m.role == "system" and m.tools and not m.content)],
            "max_tokens": max_tokens, "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(params, name):
                body[name] = getattr(params, name)
        extra: dict[str, Any] = {}
        for name in ("top_k", "repetition_penalty"):
            value = getattr(params, name)
            if value != GenerationParams.model_fields[name].default:
                extra[name] = value
        if extra:
            body["extra_body"] = extra
        if constraint is not None:
            body.update(constraint.openai)
        return body

    def _remote(self, messages: list[Message], params: GenerationParams,
                constraint: Constraint | None) -> Generator[str, None, Completion]:
        prompt_tokens = self.count_tokens(messages)
        max_new = reply_room(prompt_tokens, self.context_length, params)
        timer = Timer()
        try:
            response = self.client.chat.completions.create(
                **self.request(messages, params, max_new, constraint))
        except self._openai.APIError as exc:
            raise self._error(exc, prompt_tokens) from None
        usage: Any = None
        server_finish: str | None = None
        reply = ReplyText(params.stop)
        calls: dict[int, list[str]] = {}  # index → [name, arguments so far]
        try:
            for event in response:
                if event.usage is not None:
                    usage = event.usage
                for choice in event.choices:
                    if choice.finish_reason is not None:
                        server_finish = choice.finish_reason
                    for call in (choice.delta.tool_calls or []) if choice.delta else []:
                        timer.token()
                        entry = calls.setdefault(call.index, ["", ""])
                        if call.function is not None:
                            entry[0] += call.function.name or ""
                            entry[1] += call.function.arguments or ""
                    content = choice.delta.content if choice.delta is not None else None
                    if not content:
                        continue
                    timer.token()
                    text = reply.push(content.encode("utf-8"))
                    if text:
                        yield text
                if reply.stopped:
                    break
        except self._openai.APIError as exc:
            raise self._error(exc, prompt_tokens) from None
        finally:
            response.close()
        tail = reply.finish()
        if tail:
            yield tail
        for name, arguments in (calls[i] for i in sorted(calls)):
            # The server's calls as the blocks rolechat reads from any model's reply.
            try:
                block = call_block(name, arguments or "{}")
            except ValueError:  # arguments cut off (max_tokens): not a call
                continue
            reply.text += ("\n" if reply.text else "") + block
            yield ("\n" if len(reply.text) > len(block) else "") + block
        finish: FinishReason = ("length" if server_finish == "length" and not reply.stopped
                                else "stop")
        estimated = usage is None and not self.exact_counts
        if usage is not None:
            prompt_tokens = int(usage.prompt_tokens)
            if not self.exact_counts:
                self._calibrate(messages, prompt_tokens)
            generated = int(usage.completion_tokens)
            details = usage.prompt_tokens_details
            cached = int(details.cached_tokens or 0) if details is not None else 0
        else:
            generated, cached = timer.tokens, 0
        return Completion(reply.text, timer.usage(prompt_tokens, cached, generated=generated,
                                                  estimated=estimated), finish)

    def _error(self, exc: Exception, prompt_tokens: int) -> Exception:
        """A rolechat error for an ``openai`` exception (mapped on class / status / code)."""
        openai = self._openai
        url = self.base_url
        if isinstance(exc, openai.APITimeoutError):
            return EngineError(url, "the request timed out",
                               "The server may be overloaded; try again.")
        if isinstance(exc, openai.APIConnectionError):
            return EngineError(url, "cannot connect to the server",
                               "Is the server running? Check --base-url.")
        if isinstance(exc, openai.AuthenticationError):
            return EngineError(url, "the API key was rejected (HTTP 401)",
                               "Pass --api-key (or set OPENAI_API_KEY).", status=401)
        if isinstance(exc, openai.NotFoundError):
            try:
                names = ", ".join(str(e.id) for e in _served_models(self.client)) or "(none)"
            except openai.APIError:
                names = "(the server did not say)"
            return EngineError(url, f"model {self.model!r} was not found (HTTP 404)",
                               f"Models it serves: {names}.", status=404)
        if isinstance(exc, openai.APIStatusError):
            if exc.code == "context_length_exceeded":
                return EngineError(
                    url, f"the prompt (about {prompt_tokens} tokens by rolechat's count) is too "
                    f"long for the server's context", "Pass --context-length with the "
                    f"server's real context size (now {self.context_length}, "
                    f"{self.context_source}) so that old turns are dropped in time.",
                    status=exc.status_code)
            return EngineError(url, f"HTTP {exc.status_code}: {exc.message}",
                               "Check the server's log.", status=exc.status_code)
        return EngineError(url, f"the reply broke off ({exc})", "Try again.")

    def close(self) -> None:
        self.client.close()
        close = getattr(self._tokenizer, "close", None)
        if close is not None:
            close()

    def describe(self) -> dict[str, Any]:
        counting = (f"exact (tokenizer {self.tokenizer_path})" if self.exact_counts else
                    f"estimate (bytes/3 + digits + punctuation + non-ASCII bytes, "
                    f"+{ESTIMATE_PER_MESSAGE}/message, +{ESTIMATE_TEMPLATE}/prompt, "
                    f"x{ESTIMATE_MARGIN} margin)")
        return {**super().describe(), "base_url": self.base_url,
                "context_source": self.context_source, "token_counting": counting}
