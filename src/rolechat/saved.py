"""SavedChat: a conversation, its live :class:`~rolechat.chat.Chat` and its stored record as one
object that keeps them consistent.

Contract:
- :meth:`SavedChat.new` starts a conversation; :meth:`SavedChat.resume` continues stored
  conversation ``cid`` with its persona, system prompt and parameters. With ``store=None`` the
  chat is not saved (every method still works, on the chat alone).
- A new conversation's row is created when its first turn starts generating (``lazy``, the
  default), so a message that fails validation saves nothing; ``lazy=False`` creates it at once
  (the server hands out its id).
- ``stream``/``send`` are the chat's; the store records the turn as it happens: the user's
  message ``pending`` before generation, the reply and the message's ``complete`` status in one
  transaction when it finishes, ``interrupted`` when it does not (with the reply's text so far,
  marked ``interrupted`` too: shown, never sent back to the model).
- ``undo`` removes the last turn; ``retry`` removes it and generates it again — a retry that
  does not complete puts the old turn back, its usage included. ``set_system``,
  ``set_persona``, ``set_params`` change the chat and the stored row together. ``reset`` starts
  a new conversation with the same role and parameters (the old one stays saved). Each change
  is written to the store first, so a store error leaves both as they were.
- A finished reply the store will not take (locked by another process past its wait) is kept
  in a recovery file beside the store, with a warning; the next time a store opens there, it is
  saved. No reply is lost.
- A stored conversation names its KV state to the engine (``conversation-<id>``, with the disk
  tier ``kv_disk`` beside the store), so it resumes warm.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .chat import Chat, Reply, ReplyStream
from .conversation import Turn
from .engines.base import Engine
from .engines.snapshots import CacheKey, DiskTier, conversation_snapshot
from .errors import InvalidInput, StoreError
from .memory import Memory
from .params import GenerationParams, valid_defaults
from .persona import get_persona
from .store import Store, StoredMessage, check_memory_record
from .window import Window, WindowPlan

log = logging.getLogger("rolechat.store")


def usage_record(reply: Reply) -> dict[str, Any]:
    """What the store keeps of a reply's usage."""
    return {**reply.usage.to_dict(), "finish_reason": reply.finish_reason,
            "window": reply.plan.to_dict()}


@dataclass(frozen=True)
class RemovedTurn:
    """A turn taken out by undo or retry, with what is needed to put it back."""

    turn: Turn
    user: StoredMessage | None
    reply: StoredMessage | None
    last_reply: Reply | None


class SavedChat:
    """One conversation: the live chat and its stored record."""

    def __init__(self, chat: Chat, store: Store | None, cid: int | None = None, *,
                 kv_disk: DiskTier | None = None, title: str = "",
                 owner: str | None = None) -> None:
        self.chat = chat
        self.store = store
        self.kv_disk = kv_disk
        self._cid = cid
        self._title, self._owner = title, owner
        self._retrying: RemovedTurn | None = None
        chat.log = self
        if cid is not None:
            chat.cache_key = CacheKey(conversation_snapshot(cid), kv_disk)

    # ----- opening -----------------------------------------------------------------------
    @classmethod
    def new(cls, engine: Engine, *, store: Store | None = None, persona: str | None = None,
            system: str | None = None,
            params: GenerationParams | Mapping[str, Any] | None = None, title: str = "",
            owner: str | None = None, kv_disk: DiskTier | None = None,
            lazy: bool = True, window: Window | None = None) -> SavedChat:
        saved = cls(Chat(engine, persona=persona, system=system, params=params, window=window),
                    store, kv_disk=kv_disk, title=title, owner=owner)
        if not lazy:
            saved.ensure()
        return saved

    @classmethod
    def resume(cls, engine: Engine, store: Store, cid: int, *, persona: str | None = None,
               system: str | None = None,
               params: GenerationParams | Mapping[str, Any] | None = None,
               kv_disk: DiskTier | None = None, save: bool = True,
               window: Window | None = None) -> SavedChat:
        """Conversation ``cid`` with its stored persona, system prompt, parameters and memory
        (its summary, pins and memory mode); those given here override them, and are saved
        with it unless ``save`` is False (then they apply to this session only)."""
        info = store.info(cid)
        overrides = (params if isinstance(params, GenerationParams)
                     else GenerationParams.from_mapping(params))
        # A value stored before a range was narrowed (temperature 5) falls back to the default.
        stored = GenerationParams(**valid_defaults(info.params))
        conversation = store.conversation(cid)
        record = check_memory_record(info.memory, len(conversation.turns))
        chat = Chat(engine, persona=persona or info.persona,
                    params=stored.merged(**overrides.explicit()),
                    conversation=conversation, window=window)
        if window is None and record["mode"] != chat.window.memory and "mode" in info.memory:
            chat.window = dataclasses.replace(chat.window, memory=record["mode"])
        chat.memory = Memory.from_dict(record)
        chat.first_turn = chat.memory.covers  # what the summary holds stays out of the prompt
        if system is not None:
            chat.system = system
        if save and (persona is not None or system is not None or overrides.explicit()):
            store.update(cid, persona=chat.persona.name, system=chat.system,
                         params=chat.params.explicit())
        saved = cls(chat, store, cid, kv_disk=kv_disk)
        if save and window is not None and window.memory != record["mode"]:
            store.update(cid, memory=saved.memory_record())
        return saved

    def memory_record(self, memory: Memory | None = None, mode: str | None = None
                      ) -> dict[str, Any]:
        """What the store keeps of ``memory`` (default: the chat's) with the window's memory
        ``mode`` (default: the chat window's)."""
        memory = memory if memory is not None else self.chat.memory
        return {"mode": mode or self.chat.window.memory, **memory.to_dict()}

    @property
    def cid(self) -> int | None:
        """The stored conversation's id (None until it is created, or without a store)."""
        return self._cid

    def ensure(self) -> int | None:
        """Create the stored conversation now if it does not exist yet; its id."""
        if self._cid is None and self.store is not None:
            chat = self.chat
            self._cid = self.store.create(
                persona=chat.persona.name, system=chat.system, model=chat.engine.model,
                params=chat.params.explicit(), title=self._title, owner=self._owner)
            if chat.window.memory != "none" or chat.memory.pins:
                self.store.update(self._cid, memory=self.memory_record())
            chat.cache_key = CacheKey(conversation_snapshot(self._cid), self.kv_disk)
        return self._cid

    # ----- turns -------------------------------------------------------------------------
    def plan(self, text: str, **overrides: Any) -> WindowPlan:
        return self.chat.plan(text, **overrides)

    def prompt(self, text: str, **overrides: Any) -> str:
        return self.chat.prompt(text, **overrides)

    def stream(self, text: str, *, pinned: bool = False, **overrides: Any) -> ReplyStream:
        return self.chat.stream(text, pinned=pinned, **overrides)

    def send(self, text: str, *, pinned: bool = False, **overrides: Any) -> Reply:
        return self.chat.send(text, pinned=pinned, **overrides)

    def undo(self) -> Turn | None:
        """Remove the last completed turn (chat and store); None if there is none."""
        removed = self._remove_last()
        return removed.turn if removed is not None else None

    def retry(self, **overrides: Any) -> ReplyStream:
        """Remove the last turn and generate its reply again. If the new reply does not
        complete, the old turn comes back (with its usage)."""
        removed = self._remove_last()
        if removed is None:
            raise InvalidInput("There is no turn to retry.", "Send a message first.")
        self._retrying = removed
        try:
            return self.chat.stream(removed.turn.user, **overrides)
        except BaseException:
            self._put_back()
            raise

    def _remove_last(self) -> RemovedTurn | None:
        chat = self.chat
        if not chat.conversation.turns:
            return None
        user = reply = None
        if self.store is not None and self._cid is not None:
            stored = self.store.messages(self._cid)
            answers = [i for i, m in enumerate(stored)
                       if m.role == "assistant" and m.status == "complete"]
            if answers:
                reply = stored[answers[-1]]
                user = stored[answers[-1] - 1] if answers[-1] > 0 else None
            self.store.drop_last_turn(self._cid)
        last_reply, memory = chat.last_reply, chat.memory.copy()
        turn = chat.pop_turn()
        assert turn is not None
        if chat.memory != memory:  # the turn was pinned
            self._save(memory=self.memory_record())
        return RemovedTurn(turn, user, reply, last_reply)

    def _put_back(self) -> None:
        removed, self._retrying = self._retrying, None
        if removed is None:
            return
        if self.store is not None and self._cid is not None:
            user_tokens = removed.user.tokens if removed.user is not None else None
            handle = self.store.begin_turn(self._cid, removed.turn.user, user_tokens)
            reply = removed.reply
            self.store.complete_turn(self._cid, handle, removed.turn.assistant,
                                     reply.tokens or 0 if reply is not None else 0,
                                     reply.usage or {} if reply is not None else {})
        self.chat.push_turn(removed.turn, removed.last_reply)

    # ----- the TurnLog the chat reports to -----------------------------------------------
    def started(self, text: str, plan: WindowPlan, *, continues: bool = False) -> Any:
        if self.store is None:
            return None
        if continues:  # nothing is written until the continuation is complete
            return "continues"
        cid = self.ensure()
        assert cid is not None
        engine = self.chat.engine
        tokens = engine.count_text(text) if engine.exact_counts else None
        return self.store.begin_turn(cid, text, tokens)

    def completed(self, handle: Any, text: str, reply: Reply) -> None:
        self._retrying = None
        if self.store is None or handle is None or self._cid is None:
            return
        tokens, usage = reply.usage.generated_tokens, usage_record(reply)
        if handle == "continues":
            self.store.extend_last_reply(self._cid, reply.text, tokens, usage)
            return
        try:
            self.store.complete_turn(self._cid, handle, reply.text, tokens, usage,
                                     memory=self.memory_record())
        except StoreError as exc:
            if exc.missing:
                raise
            # The reply exists; the database would not take it (locked too long): keep it in
            # a file that the next start saves, rather than lose it.
            kept = self.store.keep_for_later(self._cid, handle, text, reply.text, tokens, usage)
            log.warning("the conversation store was busy, so this turn was kept in %s; it is "
                        "saved the next time rolechat opens the store (%s)", kept, exc.reason)

    def failed(self, handle: Any, partial: str = "") -> None:
        if self.store is not None and isinstance(handle, int):
            self.store.interrupt_turn(handle, partial)
        self._put_back()

    def continue_reply(self, **overrides: Any) -> ReplyStream:
        """Go on with the last reply where it stopped; what is added is appended to it, in the
        store too (a continuation that does not complete changes nothing)."""
        return self.chat.continue_reply(**overrides)

    # ----- memory ------------------------------------------------------------------------
    def set_pins(self, pins: Iterable[int]) -> set[int]:
        """Pin exactly the turns ``pins`` (from 0; -1: the last), each checked before anything
        changes; saved with the conversation. Returns the pinned indices."""
        chat = self.chat
        wanted = {chat._turn_index(p) for p in pins}
        memory = chat.memory.copy()
        memory.pins = wanted
        self._save(memory=self.memory_record(memory))
        chat.memory.pins = set(wanted)
        return wanted

    def pin(self, turn: int = -1) -> int:
        """Keep turn ``turn`` (from 0; -1: the last) in every prompt; saved with the
        conversation. Returns its index."""
        index = self.chat._turn_index(turn)
        self.set_pins(self.chat.memory.pins | {index})
        return index

    def unpin(self, turn: int) -> int:
        """Let the window drop turn ``turn`` again; saved with the conversation."""
        index = self.chat._turn_index(turn)
        if index not in self.chat.memory.pins:
            return self.chat.unpin(index)  # its error says which turns are pinned
        self.set_pins(self.chat.memory.pins - {index})
        return index

    def set_memory(self, memory: str) -> None:
        """Switch the window's memory (``none`` or ``summary``); saved with the conversation.
        The summary made so far stays; ``none`` makes no more of it."""
        chat = self.chat
        window = dataclasses.replace(chat.window, memory=memory)
        self._save(memory=self.memory_record(mode=window.memory))
        chat.window = window

    # ----- role and parameters -----------------------------------------------------------
    def _save(self, **fields: Any) -> None:
        if self.store is not None and self._cid is not None:
            self.store.update(self._cid, **fields)

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None: none)."""
        from .conversation import check_text

        if text is not None:
            check_text(text, "system prompt")
        self._save(system=text)
        self.chat.system = text

    def set_persona(self, name: str, *, keep: Mapping[str, Any] | None = None) -> None:
        """Switch to persona ``name``: its system prompt and default parameters, with the
        parameters in ``keep`` (what the user chose) still applied on top."""
        persona = get_persona(name)
        params = persona.params.merged(**dict(keep or {}))
        self._save(persona=persona.name, system=persona.system, params=params.explicit())
        chat = self.chat
        chat.persona, chat.system, chat.params = persona, persona.system, params

    def set_params(self, params: GenerationParams) -> None:
        self._save(params=params.explicit())
        self.chat.params = params

    def reset(self) -> SavedChat:
        """A new conversation with this one's persona, system prompt and parameters (this one
        stays saved)."""
        chat = self.chat
        fresh = SavedChat(Chat(chat.engine, persona=chat.persona, system=chat.system,
                               params=chat.params, window=chat.window), self.store,
                          kv_disk=self.kv_disk, owner=self._owner)
        if self._cid is not None:
            fresh.ensure()
        return fresh
