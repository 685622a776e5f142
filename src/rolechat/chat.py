"""Chat: a session that wires persona, conversation, window, template and engine together.

Contract:
- ``Chat(engine, persona=..., params=..., window=...)``; ``send(text) -> Reply`` and
  ``stream(text)`` (an iterator of text chunks whose ``reply`` is set at the end).
- Input is validated when ``send``/``stream`` is *called*, before anything is generated.
- The turn is appended to ``chat.conversation`` only after the last chunk. An exception, an
  early ``close()`` or Ctrl-C leaves the conversation exactly as it was before the reply.
- The window is sticky across turns (see :mod:`rolechat.window`), which keeps the engine's
  cached prefix valid.
- :func:`inference` and :func:`chat_turn` are the seed tutorial's functional API, unchanged in
  signature and result: ``{"response", "generated_tokens_count", "history"}``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Protocol

from .conversation import Conversation, Message, Turn, check_text
from .engines import load_engine
from .engines.base import Completion, Engine, FinishReason, Generation, Usage
from .errors import ContextOverflow, InvalidInput, InvalidParams
from .functions import MAX_ROUNDS
from .functions import run as run_functions
from .memory import DEFAULT_TEMPLATE, Memory, SummaryFailed, summarize, summary_request
from .params import GenerationParams
from .persona import TUTORIAL_SYSTEM, Persona, get_persona
from .shapes import OpenTurn, ReplyShape
from .toolcalls import CallIds, ToolCall, parse_reply
from .window import Window, WindowPlan


@dataclass(frozen=True)
class Reply:
    text: str
    usage: Usage
    finish_reason: FinishReason
    #: Which turns the prompt held, and its token count.
    plan: WindowPlan
    #: The parameters the reply was generated with, and where each came from.
    params: GenerationParams | None = None
    params_from: dict[str, str] | None = None
    #: The stored turn's name (its reply's id in the store; a saved chat sets it), else None.
    turn: int | None = None
    #: A reply under a JSON constraint (``schema=`` or ``json=True``): its value (an instance
    #: of the pydantic model that was the schema); None when none was asked for or the reply
    #: was cut off at ``max_new_tokens`` before its JSON ended (``finish_reason`` "length").
    parsed: Any = None
    #: The tools the reply calls (``finish_reason`` "tool_calls"; ``text`` is what it says
    #: beside them). Such a reply is no turn yet: its results come next (``steps``).
    tool_calls: tuple[ToolCall, ...] = ()
    #: The tool calls and results of the turn before this reply (the function loop's).
    steps: tuple[Message, ...] = ()


class TurnLog(Protocol):
    """Something that records turns as they happen (a
    :class:`~rolechat.saved.SavedChat`): ``started`` before generating, then exactly one of
    ``completed`` (which returns the stored turn's name, or None) or ``failed``."""

    def started(self, text: str, plan: WindowPlan, *, continues: bool = False) -> Any: ...

    def completed(self, handle: Any, text: str, reply: Reply) -> int | None: ...

    def failed(self, handle: Any, partial: str = "") -> None: ...


class ReplyStream(Iterator[str]):
    """Text chunks of one reply. ``reply`` is set once the stream is exhausted."""

    def __init__(self, chat: Chat, text: str, plan: WindowPlan, params: GenerationParams, *,
                 prompt_ids: list[int] | None = None, continues: bool = False,
                 pinned: bool = False, shape: ReplyShape | None = None) -> None:
        self._chat, self._text, self._plan, self._params = chat, text, plan, params
        self._pinned = pinned
        self._shape = shape
        #: The ids of the calls this reply makes (a parser of its stream given these names
        #: them as the reply does).
        self.call_ids = CallIds()
        #: True when this reply continues the last one (its text is appended to it).
        self.continues = continues
        self.reply: Reply | None = None
        # The log first: a saved chat creates its conversation now, and with it the cache key.
        # A round after tool calls goes on with the turn its first round began.
        open_turn, chat.open_turn = chat.open_turn, None
        if open_turn is not None and plan.steps and open_turn.text == text:
            self._handle = open_turn.handle
        else:
            if open_turn is not None and chat.log is not None:  # left with its calls open
                chat.log.failed(open_turn.handle)
            self._handle = (chat.log.started(text, plan, continues=continues)
                            if chat.log is not None else None)
        self._open = True
        #: The text so far (kept, marked interrupted, if the reply does not complete).
        self._parts: list[str] = []
        #: The chat's memory after this reply's slide (set when the slide folds turns into the
        #: summary; it becomes the chat's only when the reply completes).
        self._memory: Memory | None = None
        #: Told how many requests are ahead while the engine has no room for this reply yet.
        self.on_wait: Callable[[int], None] | None = None
        #: The engine's generation now running (what cancel() stops).
        self._engine_stream: Generation | None = None
        try:
            if plan.summarize:  # summarize first, in the engine's turn (see _after_summary)
                self._generation: Generation = Generation(self._after_summary())
            else:
                self._generation = self._engine(plan, prompt_ids if prompt_ids is not None
                                                else plan.prompt_ids)
        except BaseException:
            self._open = False
            if chat.log is not None:
                chat.log.failed(self._handle)
            raise

    def _after_summary(self) -> Generator[str, None, Completion]:
        """Fold the dropped turns into the summary, plan again with it, then the reply."""
        chat = self._chat
        self._plan, self._memory = chat._fold(self._plan, self._text, self._params)
        inner = self._engine(self._plan, self._plan.prompt_ids)
        try:
            while True:
                try:
                    chunk = next(inner)
                except StopIteration:
                    assert inner.completion is not None
                    return inner.completion
                yield chunk
        finally:
            inner.close()

    def _engine(self, plan: WindowPlan, prompt_ids: list[int] | None) -> Generation:
        """Start the engine's generation of this reply."""
        constraint = self._shape.constraint if self._shape is not None else None
        generation = self._chat.engine.stream(plan.messages, self._params, prompt_ids=prompt_ids,
                                              cache_key=self._chat.cache_key,
                                              constraint=constraint)
        generation.on_wait = self._waited
        self._engine_stream = generation
        return generation

    def _waited(self, ahead: int) -> None:
        if self.on_wait is not None:
            self.on_wait(ahead)

    @property
    def handle(self) -> Any:
        """What the chat's log named this turn when it began (a saved chat's: its pending
        message's id; None without a log)."""
        return self._handle

    def cancel(self) -> None:
        """Stop the reply soon, from any thread: its reader then gets
        :class:`~rolechat.engines.base.Cancelled` (and the turn is stored interrupted)."""
        stream = self._engine_stream
        if stream is not None:
            stream.cancel()

    @property
    def plan(self) -> WindowPlan:
        """The reply's window plan (after a slide's summary, once generation began)."""
        return self._plan

    def __next__(self) -> str:
        try:
            chunk = next(self._generation)
            self._parts.append(chunk)
            return chunk
        except StopIteration:
            completion = self._generation.completion
            assert completion is not None
            if self.reply is None:
                shape, text, finish = self._shape, completion.text, completion.finish_reason
                parsed = (shape.parse(text, finish, self._chat.engine.model)
                          if shape is not None else None)
                calls: tuple[ToolCall, ...] = ()
                if shape is not None and shape.tools is not None:
                    text, found = parse_reply(text, self.call_ids)
                    calls = tuple(found)
                    if calls and finish == "stop":
                        finish = "tool_calls"
                self.reply = Reply(text, completion.usage, finish, self._plan, self._params,
                                   self._chat.params_from(self._params), parsed=parsed,
                                   tool_calls=calls, steps=self._plan.steps)
                if calls:  # no turn yet: the calls' results come first
                    self._open = False
                    self._chat.open_turn = OpenTurn(self._text, self._handle, (
                        *self._plan.steps, Message("assistant", text, calls)))
                    raise
                self._open = False
                if self._memory is not None:
                    self._chat.memory = self._memory
                if self.continues:
                    self._chat._extend(self.reply)
                else:
                    self._chat._record(self._text, self.reply)
                    if self._pinned:
                        self._chat.memory.pins.add(len(self._chat.conversation.turns) - 1)
                if self._chat.log is not None:
                    turn = self._chat.log.completed(self._handle, self._text, self.reply)
                    if turn is not None:
                        self.reply = replace(self.reply, turn=turn)
                        self._chat.last_reply = self.reply
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop now; the conversation is left as it was before this reply (the log keeps the
        text so far, marked interrupted)."""
        generation = getattr(self, "_generation", None)
        if generation is not None:
            generation.close()
        if self._open:
            self._open = False
            if self._chat.log is not None:
                self._chat.log.failed(self._handle, "".join(self._parts))

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Chat:
    """One conversation with one engine."""

    def __init__(self, engine: Engine | None = None, *, persona: str | Persona | None = None,
                 system: str | None = None,
                 params: GenerationParams | Mapping[str, Any] | None = None,
                 window: Window | None = None, conversation: Conversation | None = None,
                 log: TurnLog | None = None) -> None:
        if engine is not None and not isinstance(engine, Engine):
            raise InvalidInput(f"engine must be a rolechat engine, got {type(engine).__name__}.",
                               "Create one with rolechat.load_engine().", field="engine")
        self.engine = engine if engine is not None else load_engine()
        if persona is not None and not isinstance(persona, (str, Persona)):
            raise InvalidInput(f"persona must be a persona's name or a Persona, got "
                               f"{type(persona).__name__}.", "Pass e.g. persona=\"expert\".",
                               field="persona")
        self.persona = get_persona(persona)
        if params is not None and not isinstance(params, (GenerationParams, Mapping)):
            raise InvalidParams([("params", f"must be a mapping of parameter names to values "
                                            f"or GenerationParams, got {type(params).__name__}")])
        if not isinstance(params, GenerationParams):
            params = GenerationParams.from_mapping(params)
        #: Persona defaults, overridden by what the caller set explicitly.
        self.params = self.persona.params.merged(**params.explicit())
        self.window = window or self.persona.window_for()
        #: What the window keeps of dropped turns: the running summary and the pins.
        self.memory = Memory()
        if conversation is None:
            conversation = Conversation(system if system is not None else self.persona.system)
        elif system is not None:
            conversation.system = check_text(system, "system prompt")
        self.conversation = conversation
        self.first_turn = 0
        self.last_reply: Reply | None = None
        #: A turn whose last reply called tools (the next round, with the calls' results as
        #: steps, goes on with it).
        self.open_turn: OpenTurn | None = None
        #: Records each turn as it happens (e.g. in the conversation store); optional.
        self.log = log
        #: Names this conversation to the engine, which keeps its KV state warm under it
        #: (a saved chat sets it; None: the engine matches snapshots by token prefix only).
        self.cache_key: str | None = None

    @property
    def system(self) -> str | None:
        return self.conversation.system

    @system.setter
    def system(self, text: str | None) -> None:
        self.conversation.system = None if text is None else check_text(text, "system prompt")

    def effective_params(self, **overrides: Any) -> GenerationParams:
        """The parameters a reply uses: the model's own defaults (its generation config), then
        the persona's and the caller's (``self.params``), then this call's ``overrides``."""
        model = {k: v for k, v in self.engine.model_defaults.items()
                 if k not in self.params.explicit()}
        base = self.params.merged(**model) if model else self.params
        return base.merged(**overrides) if overrides else base

    def params_from(self, params: GenerationParams | None = None) -> dict[str, str]:
        """Where each parameter of ``params`` (default: the next reply's) comes from:
        ``this reply`` (a per-call override), ``you`` (set for this chat), ``persona``,
        ``model`` (the model's generation config) or ``rolechat`` (its default)."""
        params = params or self.effective_params()
        mine, persona = self.params.explicit(), self.persona.params.explicit()
        model = self.engine.model_defaults
        sources = {}
        for name in GenerationParams.model_fields:
            value = getattr(params, name)
            if name in mine and mine[name] == value:
                sources[name] = ("persona" if name in persona and persona[name] == value
                                 else "you")
            elif name in model and model[name] == value and name not in mine:
                sources[name] = "model"
            elif name in params.explicit():
                sources[name] = "this reply"
            else:
                sources[name] = "rolechat"
        return sources

    def plan(self, text: str, *, steps: Sequence[Message] = (),
             tools: Sequence[dict[str, Any]] = (), **overrides: Any) -> WindowPlan:
        """Which turns would go into the prompt for ``text`` (and the turn's tool ``steps``
        so far, offering ``tools``); nothing is generated."""
        check_text(text, "user message")
        if self.conversation.pending is not None:
            raise InvalidInput("The conversation ends with a user message that has no reply.",
                               "Remove it (conversation.pop_turn()) or answer it first.")
        if steps:  # the calls and results must make a turn's steps
            Conversation(None, [Message("user", text), *steps])
        return self._window_plan(text, overrides, steps, tools)

    def next_plan(self, **overrides: Any) -> WindowPlan:
        """The plan for the next message before any of it is written (a preview): the
        conversation so far, then an open user turn with no text."""
        return self._window_plan("", overrides)

    def _window_plan(self, text: str, overrides: Mapping[str, Any],
                     steps: Sequence[Message] = (),
                     tools: Sequence[dict[str, Any]] = ()) -> WindowPlan:
        return self.window.plan(self.conversation, text, self.engine,
                                self.effective_params(**overrides), first_turn=self.first_turn,
                                memory=self.memory, steps=steps, tools=tools)

    def prompt(self, text: str, **overrides: Any) -> str:
        """The exact text the model would receive for ``text``."""
        return self.engine.render(self.plan(text, **overrides).messages)

    def stream(self, text: str, *, pinned: bool = False, schema: Any = None,
               json: bool = False, tools: Any = None, tool_choice: Any = None,
               parallel_tool_calls: Any = None, steps: Sequence[Message] = (),
               **overrides: Any) -> ReplyStream:
        """Start a reply to ``text``; iterate for its chunks. Validates before generating.
        With ``pinned`` the turn is pinned once it is recorded. With ``schema`` (a pydantic
        model class, a JSON Schema dict, JSON text, a .json file or the concise form
        ``"name, age int"``) the reply is JSON valid under it, and ``reply.parsed`` its value;
        ``json=True`` asks for any JSON object. With ``tools`` (OpenAI's tool list; see
        ``tool_choice`` and ``parallel_tool_calls`` there) the reply may call them: its chunks
        are the model's text as written (the calls' ``<tool_call>`` blocks too) and
        ``reply.tool_calls`` the calls; a reply that calls tools is no turn yet. ``steps`` are
        the turn's calls and their results so far (assistant messages with ``tool_calls``,
        then ``tool`` messages): the model answers after them."""
        shape = ReplyShape.of(schema, json=json, tools=tools, tool_choice=tool_choice,
                              parallel_tool_calls=parallel_tool_calls)
        params = self.effective_params(**overrides)
        offered = tuple(shape.tools.offered()) if shape is not None and shape.tools else ()
        plan = self.plan(text, steps=steps, tools=offered, **overrides)
        return ReplyStream(self, text, plan, params, pinned=pinned, shape=shape)

    def continue_reply(self, **overrides: Any) -> ReplyStream:
        """Go on with the last reply from where it stopped (cut at ``max_new_tokens``): the
        model continues the same assistant message, and what it adds is appended to it."""
        turns = self.conversation.turns
        if not turns:
            raise InvalidInput("There is no reply to continue.", "Send a message first.")
        last = turns[-1]
        params = self.effective_params(**overrides)
        before = Conversation(self.conversation.system, list(self.conversation.messages[:-2]))
        plan = self.window.plan(before, last.user, self.engine, params,
                                first_turn=min(self.first_turn, len(before.turns)),
                                memory=self.memory)
        ids = self.engine.continuation_ids([*plan.messages,
                                            Message("assistant", last.assistant)])
        if len(ids) > plan.budget:
            raise ContextOverflow(prompt_tokens=len(ids), available_tokens=plan.budget,
                                  context_length=plan.context_length,
                                  max_new_tokens=params.max_new_tokens)
        # The plan counts the prompt the model gets: the reply so far, left open. A slide here
        # drops plainly; the next reply's slide summarizes what it dropped.
        plan = replace(plan, summarize=(), prompt_ids=ids, prompt_tokens=len(ids))
        return ReplyStream(self, last.user, plan, params, prompt_ids=ids, continues=True)

    def _fold(self, plan: WindowPlan, text: str,
              params: GenerationParams) -> tuple[WindowPlan, Memory]:
        """Summarize the turns ``plan`` drops (with the previous summary), then plan again with
        the new summary. If the summarization fails, the turns are dropped plainly and the plan
        says so; the previous summary stays. Returns the new plan and memory."""
        window, memory, engine = self.window, self.memory, self.engine
        cap = window.summary_cap(engine.context_length)
        turns = [self.conversation.turns[i] for i in plan.summarize]
        template = window.summary_template or DEFAULT_TEMPLATE
        request = summary_request(template, memory.summary, turns, cap)
        left_out = 0
        while len(turns) > 1 and engine.count_tokens(request) + cap > engine.context_length:
            turns, left_out = turns[1:], left_out + 1  # the oldest first
            request = summary_request(template, memory.summary, turns, cap)
        new = memory.copy()
        note = None
        usage: Usage | None = None
        try:
            new.summary, usage = summarize(engine, request, max_tokens=cap,
                                           timeout_s=window.summary_timeout_s)
            new.covers = plan.first_turn
            new.summarized |= set(plan.summarize)
            if left_out:
                note = (f"the {left_out} oldest dropped turn(s) were too long to summarize with "
                        "the rest and were dropped without a summary")
        except SummaryFailed as exc:
            usage = exc.usage
            names = ", ".join(str(i + 1) for i in plan.summarize)
            note = f"no summary ({exc}): turn(s) {names} dropped without one"
        try:
            again = window.plan(self.conversation, text, engine, params,
                                first_turn=plan.first_turn, memory=new, steps=plan.steps,
                                tools=plan.tools)
        except ContextOverflow:  # the message and the pins leave no room for the new summary
            new, note = memory.copy(), ("the new summary did not fit beside this message: the "
                                        "dropped turns were left out without it")
            again = window.plan(self.conversation, text, engine, params,
                                first_turn=plan.first_turn, memory=new, steps=plan.steps,
                                tools=plan.tools)
        return replace(again, summarize=(), summary_usage=usage, memory_note=note), new

    # ----- pins --------------------------------------------------------------------------
    def _turn_index(self, turn: Any) -> int:
        total = len(self.conversation.turns)
        if isinstance(turn, bool) or not isinstance(turn, int):
            raise InvalidInput(f"A turn is named by its index (from 0), got {turn!r}.",
                               "For example: chat.pin(0) for the first turn.", field="turn")
        index = turn + total if turn < 0 else turn
        if not 0 <= index < total:
            raise InvalidInput(f"There is no turn {turn}: the conversation has {total} "
                               f"completed turn(s).",
                               "Name a turn from 0 to the number of turns - 1 (or -1 for the "
                               "last)." if total else "Pin a turn once it has a reply.",
                               field="turn")
        return index

    def pin(self, turn: int = -1) -> int:
        """Keep turn ``turn`` (from 0; -1 is the last) in every prompt, right after the system
        prompt, whatever the window drops. Returns its index."""
        index = self._turn_index(turn)
        self.memory.pins.add(index)
        return index

    def unpin(self, turn: int) -> int:
        """Let the window drop turn ``turn`` again. Returns its index."""
        index = self._turn_index(turn)
        if index not in self.memory.pins:
            pinned = ", ".join(str(p) for p in sorted(self.memory.pins)) or "none"
            raise InvalidInput(f"Turn {index} is not pinned (pinned: {pinned}).",
                               "Unpin one of the pinned turns.", field="turn")
        self.memory.pins.discard(index)
        return index

    def _extend(self, reply: Reply) -> None:
        last = self.conversation.messages[-1]
        self.conversation.messages[-1] = Message("assistant", last.content + reply.text)
        self.last_reply = reply

    def answer_tools(self, results: Sequence[tuple[str, str]], **options: Any) -> ReplyStream:
        """Go on with the turn whose last reply called tools: ``results`` are
        ``(tool_call_id, content)``, one per call; ``options`` as for :meth:`stream` (the
        tools offered again, ...)."""
        open_turn = self.open_turn
        if open_turn is None:
            raise InvalidInput("No tool calls are waiting for results.",
                               "Send results only after a reply that calls tools.",
                               field="tool_results")
        steps = open_turn.answered(results)
        return self.stream(open_turn.text, steps=steps, **options)

    def send(self, text: str, *, pinned: bool = False, schema: Any = None, json: bool = False,
             tools: Any = None, tool_choice: Any = None, parallel_tool_calls: Any = None,
             steps: Sequence[Message] = (), max_tool_rounds: int = MAX_ROUNDS,
             on_tool_result: Callable[[ToolCall, str], None] | None = None,
             **overrides: Any) -> Reply:
        """Reply to ``text`` and record the turn (pinned, with ``pinned``); ``schema``,
        ``json``, ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``steps`` as for
        :meth:`stream`. When ``tools`` are Python functions, the model's calls are run and
        their results fed back until it answers (at most ``max_tool_rounds`` rounds;
        :mod:`rolechat.functions`), ``on_tool_result`` hearing each call and result; the
        reply's ``steps`` hold them all."""
        if isinstance(tools, (list, tuple)) and tools and all(
                callable(t) and not isinstance(t, dict) for t in tools):
            if steps or schema is not None or json:
                raise InvalidInput("Python functions as tools run their own loop: no steps, "
                                   "schema or json beside them.", "Leave those out.",
                                   field="tools")
            return run_functions(self, text, tools, tool_choice=tool_choice,
                                 parallel_tool_calls=parallel_tool_calls,
                                 max_rounds=max_tool_rounds, on_result=on_tool_result,
                                 pinned=pinned, **overrides)
        with self.stream(text, pinned=pinned, schema=schema, json=json, tools=tools,
                         tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                         steps=steps, **overrides) as chunks:
            for _ in chunks:
                pass
        assert chunks.reply is not None
        return chunks.reply

    def _record(self, text: str, reply: Reply) -> None:
        self.conversation.append_turn(text, reply.text, reply.steps)
        self.first_turn = reply.plan.first_turn
        self.last_reply = reply

    def pop_turn(self) -> Turn | None:
        """Remove and return the last completed turn (None if there is none); the window
        keeps its place."""
        turn = self.conversation.pop_turn()
        if turn is not None:
            total = len(self.conversation.turns)
            self.first_turn = min(self.first_turn, total)
            self.memory.forget_from(total)
            self.last_reply = None
        return turn

    def push_turn(self, turn: Turn, reply: Reply | None = None) -> None:
        """Append a completed turn (one that :meth:`pop_turn` removed), with its reply."""
        self.conversation.append_turn(turn.user, turn.assistant, turn.steps)
        self.last_reply = reply

    def reset(self) -> None:
        """Forget every turn; keep the system prompt and parameters."""
        self.conversation = Conversation(self.conversation.system)
        self.first_turn = 0
        self.memory = Memory()
        self.last_reply = None


# ----- the seed tutorial's functional API --------------------------------------------------

#: Per engine: the first turn its last window kept, and that turn, so that the next call with
#: the same (grown) history slides the same way and the KV cache stays valid.
_WINDOW_HINTS: weakref.WeakKeyDictionary[Engine, tuple[int, Turn]] = weakref.WeakKeyDictionary()


def _as_engine(model: Any, tokenizer: Any) -> Engine:
    """A rolechat engine (tokenizer None), or the tutorial's transformers model + tokenizer."""
    if isinstance(model, Engine):
        if tokenizer is not None and tokenizer is not model:
            raise InvalidInput("With a rolechat engine the tokenizer is part of the engine.",
                               "Pass tokenizer=None.")
        return model
    from .engines.transformers import is_transformers_model, wrap

    if is_transformers_model(model):
        if tokenizer is None:
            raise InvalidInput("A transformers model needs its tokenizer.",
                               "Pass the AutoTokenizer loaded with the model.")
        return wrap(model, tokenizer)
    raise InvalidInput(f"model must be a rolechat engine or a transformers model, got "
                       f"{type(model).__name__}.",
                       "Create one with rolechat.load_engine() (or load_engine('model.gguf')).")


def inference(model: Any, tokenizer: Any, history: Sequence[tuple[str, str]] | None,
              user_utterance: str, max_new_tokens: int = 512, temperature: float = 0.9,
              *, system: str = TUTORIAL_SYSTEM, threads: int | None = None,
              **gen_kwargs: Any) -> dict[str, Any]:
    """Generate the reply to ``user_utterance`` after ``history``, as the tutorial does.

    Returns ``{"response": str, "generated_tokens_count": int, "history": [...]}`` where the
    history has this turn appended. ``gen_kwargs`` are further :class:`GenerationParams`;
    ``threads`` sets the engine's CPU threads from now on.
    """
    engine = _as_engine(model, tokenizer)
    if threads is not None:
        engine.set_threads(threads)
    # One pass over the history: a generator is read once, and all of it comes back.
    history = [] if history is None else history
    if not isinstance(history, (str, bytes, Mapping)) and isinstance(history, Iterable):
        history = list(history)
    conversation = Conversation.from_tuples(history, system=system)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature,
                              **gen_kwargs)
    chat = Chat(engine, params=params, conversation=conversation)
    hint = _WINDOW_HINTS.get(engine)
    turns = conversation.turns
    if hint is not None and hint[0] < len(turns) and turns[hint[0]] == hint[1]:
        chat.first_turn = hint[0]
    reply = chat.send(user_utterance)
    if chat.first_turn < len(turns):
        _WINDOW_HINTS[engine] = (chat.first_turn, turns[chat.first_turn])
    return {"response": reply.text, "generated_tokens_count": reply.usage.generated_tokens,
            "history": [*history, (user_utterance, reply.text)]}


def chat_turn(model: Any, tokenizer: Any, history: Sequence[tuple[str, str]],
              user_utterance: str, **gen_kwargs: Any) -> dict[str, Any]:
    """The tutorial's convenience wrapper: the same dict as :func:`inference`."""
    return inference(model, tokenizer, history, user_utterance, **gen_kwargs)
