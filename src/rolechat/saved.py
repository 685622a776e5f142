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
- One truth for every writer (other windows, tabs and processes write to the same store):
  the saved chat knows the version of the conversation it shows (and each turn's name, its
  reply's id). ``refresh`` compares it with the store (one indexed read) and, when another
  writer changed it, loads the turns, system prompt, memory and what else changed there, and
  says what (:class:`Changes`); ``send``/``stream``/``plan``/``prompt`` refresh first, so a
  new message's prompt holds every stored turn.
- ``undo`` removes the last turn; ``retry`` removes it and generates it again — a retry that
  does not complete puts the old turn back (the same turn: its ids and usage);
  ``continue_reply`` goes on with the last reply. Each names the turn it acts on (default: the
  last turn this chat shows; ``version=`` adds a version), checked by the store in the same
  transaction as the change: a turn that is no longer the last raises
  :class:`~rolechat.errors.ConversationChanged`, nothing is changed, and the chat shows the
  store's turns again. A turn's id comes with its reply (``Reply.turn``). ``set_system``,
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
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .chat import Chat, Reply, ReplyStream
from .conversation import Turn
from .engines.base import Engine
from .engines.snapshots import DiskTier, conversation_snapshot
from .errors import ConversationChanged, InvalidInput, RolechatError, StoreError
from .memory import Memory
from .params import GenerationParams, valid_defaults
from .persona import get_persona
from .store import ConversationInfo, Loaded, Store, StoredMessage, check_memory_record
from .window import Window, WindowPlan, memory_mode, summarizes

log = logging.getLogger("rolechat.store")


def _plain(value: Any) -> Any:
    """``value`` as the store gives it back (JSON: tuples are lists)."""
    return json.loads(json.dumps(value))


def usage_record(reply: Reply) -> dict[str, Any]:
    """What the store keeps of a reply's usage."""
    return {**reply.usage.to_dict(), "finish_reason": reply.finish_reason,
            "window": reply.plan.to_dict()}


def _stored_window(window: Window, stored: Mapping[str, Any], record: Mapping[str, Any]
                   ) -> Window:
    """``window``, summarizing or not as the stored memory record's ``mode`` says (``record``:
    that record checked); as it is when the record names no mode."""
    if "mode" not in stored or summarizes(record["mode"]) == window.summarize:
        return window
    return dataclasses.replace(window, summarize=summarizes(record["mode"]))


@dataclass(frozen=True)
class Changes:
    """What other writers changed since a saved chat last looked (:meth:`SavedChat.refresh`):
    ``added`` turns after the ones it showed, ``removed`` turns it showed that are gone or
    changed (undone, retried, continued), and whether the system prompt, persona or
    parameters (``settings``) changed."""

    added: int = 0
    removed: int = 0
    settings: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.settings)


#: The stored fields a saved chat takes from the store again when another writer changed them.
SETTINGS = ("persona", "system", "params")


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
        #: The store's version this chat shows (None: not known; the next refresh loads it).
        self._version: int | None = None
        #: Each turn's name (its reply's id; None: not stored), in step with the chat's turns.
        self._ids: list[int | None] = [None] * len(chat.conversation.turns)
        #: The stored persona, system prompt and parameters as this chat last read or wrote them.
        self._stored: dict[str, Any] = {}
        #: The turn a continuation goes on with.
        self._continuing: int | None = None
        #: The turns undo removed, newest last, each with the stored version it left: redo
        #: puts the newest back while the conversation is still at that version.
        self._undone: list[tuple[RemovedTurn, int | None]] = []
        chat.log = self
        if cid is not None:
            chat.cache_key = conversation_snapshot(cid)

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
        loaded = store.load(cid)
        info = loaded.info
        overrides = (params if isinstance(params, GenerationParams)
                     else GenerationParams.from_mapping(params))
        # A value stored before a range was narrowed (temperature 5) falls back to the default.
        stored = GenerationParams(**valid_defaults(info.params))
        conversation = loaded.conversation
        record = check_memory_record(info.memory, len(conversation.turns))
        chat = Chat(engine, persona=persona or info.persona,
                    params=stored.merged(**overrides.explicit()),
                    conversation=conversation, window=window)
        if window is None:
            chat.window = _stored_window(chat.window, info.memory, record)
        chat.memory = Memory.from_dict(record)
        chat.first_turn = chat.memory.covers  # what the summary holds stays out of the prompt
        if system is not None:
            chat.system = system
        saved = cls(chat, store, cid, kv_disk=kv_disk)
        saved._adopt(loaded)
        if save and (persona is not None or system is not None or overrides.explicit()):
            saved._save(persona=chat.persona.name, system=chat.system,
                        params=chat.params.explicit())
        if save and window is not None and window.summarize != summarizes(record["mode"]):
            saved._save(memory=saved.memory_record())
        return saved

    def memory_record(self, memory: Memory | None = None, summarize: bool | None = None
                      ) -> dict[str, Any]:
        """What the store keeps of ``memory`` (default: the chat's), with the memory ``mode``
        of a window that does or does not ``summarize`` (default: the chat window's)."""
        memory = memory if memory is not None else self.chat.memory
        summarize = self.chat.window.summarize if summarize is None else summarize
        return {"mode": memory_mode(summarize), **memory.to_dict()}

    @property
    def cid(self) -> int | None:
        """The stored conversation's id (None until it is created, or without a store)."""
        return self._cid

    @property
    def version(self) -> int | None:
        """The store's version of the conversation this chat shows (None: not known)."""
        return self._version

    @property
    def turn_ids(self) -> list[int | None]:
        """Each turn's name: its reply's id in the store (None: not stored)."""
        return list(self._ids)

    @property
    def last_turn(self) -> int | None:
        """The name of the last turn this chat shows (None: it shows none, or not stored)."""
        if not self._ids or len(self._ids) != len(self.chat.conversation.turns):
            return None
        return self._ids[-1]

    def ensure(self) -> int | None:
        """Create the stored conversation now if it does not exist yet; its id."""
        if self._cid is None and self.store is not None:
            chat = self.chat
            self._cid = self.store.create(
                persona=chat.persona.name, system=chat.system, model=chat.engine.model,
                params=chat.params.explicit(), title=self._title, owner=self._owner)
            self._version = 0
            self._stored = {"persona": chat.persona.name, "system": chat.system,
                            "params": _plain(chat.params.explicit())}
            if chat.window.summarize or chat.memory.pins:
                self._save(memory=self.memory_record())
            chat.cache_key = conversation_snapshot(self._cid)
        return self._cid

    # ----- other writers -----------------------------------------------------------------
    def refresh(self) -> Changes:
        """Catch up with what other writers (windows, tabs, processes) stored since this chat
        last looked: one indexed read when nothing changed, else :meth:`reload`."""
        if self.store is None or self._cid is None:
            return Changes()
        if self._version is not None and self.store.version_of(self._cid) == self._version:
            return Changes()
        return self.reload()

    def reload(self) -> Changes:
        """Show the stored conversation again: its turns and memory, and the persona, system
        prompt and parameters where another writer changed them (settings given for this
        session only stay otherwise). What changed."""
        assert self.store is not None and self._cid is not None
        loaded = self.store.load(self._cid)
        chat, old, new = self.chat, self._ids, list[int | None](loaded.turn_ids)
        same = 0  # how many turns, from the first, are still the ones shown
        while same < min(len(old), len(new)) and old[same] is not None and \
                old[same] == new[same]:
            same += 1
        if old != new:
            system = chat.system
            chat.conversation = loaded.conversation
            chat.conversation.system = system
            if not old or not new or old[-1] != new[-1]:  # its last reply is not the last
                chat.last_reply = None
        settings = self._take_settings(loaded.info)
        record = check_memory_record(loaded.info.memory, len(new))
        chat.window = _stored_window(chat.window, loaded.info.memory, record)
        chat.memory = Memory.from_dict(record)
        chat.first_turn = max(min(chat.first_turn, same), chat.memory.covers)
        self._ids, self._version = new, loaded.version
        return Changes(added=len(set(new) - set(old)), removed=len(set(old) - set(new) - {None}),
                       settings=settings)

    def _adopt(self, loaded: Loaded) -> None:
        """The chat shows ``loaded`` (just read from the store)."""
        info = loaded.info
        self._version, self._ids = loaded.version, list(loaded.turn_ids)
        self._stored = {"persona": info.persona, "system": info.system,
                        "params": _plain(info.params)}

    def _take_settings(self, info: ConversationInfo) -> bool:
        """Take the stored persona, system prompt and parameters that another writer changed;
        whether any had."""
        chat, seen, changed = self.chat, self._stored, False
        if (info.persona, _plain(info.params)) != (seen.get("persona"), seen.get("params")):
            try:
                persona = get_persona(info.persona)
            except RolechatError:  # a user persona that is gone here: keep this chat's
                persona = chat.persona
            stored = GenerationParams(**valid_defaults(info.params))
            chat.persona, chat.params = persona, persona.params.merged(**stored.explicit())
            changed = True
        if info.system != seen.get("system"):
            chat.system = info.system
            changed = True
        self._stored = {"persona": info.persona, "system": info.system,
                        "params": _plain(info.params)}
        return changed

    def _saw(self, version: int) -> None:
        """This chat's own write left the conversation at ``version``: still known if nobody
        else wrote in between, else unknown (the next refresh loads the store's)."""
        known = self._version
        self._version = version if known is not None and version == known + 1 else None

    # ----- turns -------------------------------------------------------------------------
    def plan(self, text: str, **overrides: Any) -> WindowPlan:
        self.refresh()
        return self.chat.plan(text, **overrides)

    def prompt(self, text: str, **overrides: Any) -> str:
        self.refresh()
        return self.chat.prompt(text, **overrides)

    def stream(self, text: str, *, pinned: bool = False, **overrides: Any) -> ReplyStream:
        self.refresh()  # the prompt holds every stored turn, other writers' too
        return self.chat.stream(text, pinned=pinned, **overrides)

    def answer_tools(self, results: Sequence[tuple[str, str]], **options: Any) -> ReplyStream:
        """The results of the calls the last reply made: the model goes on with that turn
        (see :meth:`~rolechat.chat.Chat.answer_tools`)."""
        self.refresh()
        return self.chat.answer_tools(results, **options)

    def send(self, text: str, *, pinned: bool = False, **overrides: Any) -> Reply:
        self.refresh()
        return self.chat.send(text, pinned=pinned, **overrides)

    def undo(self, turn: int | None = None, *, version: int | None = None) -> Turn | None:
        """Remove the last completed turn (chat and store); None if there is none. ``turn``
        names it (default: the last turn this chat shows); ``version``, the version it must be
        at. If the conversation changed, ConversationChanged, and nothing is removed."""
        removed = self._remove_last(turn, version)
        if removed is None:
            return None
        after = (self.store.version_of(self._cid)
                 if self.store is not None and self._cid is not None else None)
        self._undone.append((removed, after))
        return removed.turn

    def redo(self) -> Turn | None:
        """Put back the turn the last :meth:`undo` removed (its text, reply, usage and ids),
        if the conversation has not changed since; None if there is nothing to redo. A change
        since (a new message, another writer) is ConversationChanged, and redo forgets what it
        held: the turn would no longer be the last."""
        if not self._undone:
            return None
        removed, after = self._undone[-1]
        if self.store is not None and self._cid is not None:
            current = self.store.version_of(self._cid)
            if current != after:
                self._undone.clear()
                raise ConversationChanged(self._cid, turn=None, last=self.last_turn,
                                          version=after, current=current)
        self._undone.pop()
        self.refresh()
        self._retrying = removed
        self._put_back()
        if self._undone and self.store is not None and self._cid is not None:
            # Back where the undo before it left the conversation: that one may be redone.
            earlier, _ = self._undone[-1]
            self._undone[-1] = (earlier, self.store.version_of(self._cid))
        return removed.turn

    def retry(self, turn: int | None = None, *, version: int | None = None,
              **overrides: Any) -> ReplyStream:
        """Remove the last turn (named as for :meth:`undo`) and generate its reply again (after
        the same tool calls and results, if it had any). If the new reply does not complete,
        the old turn comes back (with its usage)."""
        removed = self._remove_last(turn, version)
        if removed is None:
            raise InvalidInput("There is no turn to retry.", "Send a message first.")
        self._retrying = removed
        try:
            return self.chat.stream(removed.turn.user, steps=removed.turn.steps, **overrides)
        except BaseException:
            self._put_back()
            raise

    def continue_reply(self, turn: int | None = None, *, version: int | None = None,
                       **overrides: Any) -> ReplyStream:
        """Go on with the last reply (named as for :meth:`undo`) where it stopped; what is
        added is appended to it, in the store too (a continuation that does not complete
        changes nothing)."""
        self._continuing = self.check(turn, version=version)
        self.refresh()  # it is still the last turn: take what else changed
        return self.chat.continue_reply(**overrides)

    def check(self, turn: int | None = None, *, version: int | None = None) -> int | None:
        """The turn an action names (default: the last turn this chat shows; None: it shows
        none), if it is still the stored conversation's last turn (and, with ``version``, at
        that version); else ConversationChanged, after which this chat shows the store's
        turns."""
        named = turn if turn is not None else self.last_turn
        if self.store is not None and self._cid is not None:
            self._stale_unless(lambda store, cid: store.check_last_turn(cid, named, version))
        return named

    def _stale_unless(self, act: Callable[[Store, int], Any]) -> Any:
        """``act(store, cid)``; if the conversation changed under it, show the store's turns
        again before the error goes on."""
        assert self.store is not None and self._cid is not None
        try:
            return act(self.store, self._cid)
        except ConversationChanged:
            self.reload()
            raise

    def _remove_last(self, turn: int | None, version: int | None) -> RemovedTurn | None:
        chat = self.chat
        if self.store is None or self._cid is None:
            if not chat.conversation.turns:
                return None
            last_reply = chat.last_reply
            popped = chat.pop_turn()
            assert popped is not None
            del self._ids[len(chat.conversation.turns):]
            return RemovedTurn(popped, None, None, last_reply)
        named = turn if turn is not None else self.last_turn
        dropped = self._stale_unless(
            lambda store, cid: store.drop_last_turn(cid, named, version=version))
        if dropped is None:
            return None
        last_reply = None
        if self.last_turn == dropped.reply.id:  # the turn this chat shows last
            last_reply = chat.last_reply
            chat.pop_turn()  # its pins go, as they did in the store
            self._ids.pop()
            self._saw(dropped.version)
        else:
            self.reload()
        return RemovedTurn(Turn(dropped.user.content, dropped.reply.content,
                                dropped.reply.steps), dropped.user, dropped.reply, last_reply)

    def _put_back(self) -> None:
        removed, self._retrying = self._retrying, None
        if removed is None:
            return
        stored: int | None = None
        if self.store is not None and self._cid is not None and removed.user is not None \
                and removed.reply is not None:
            version = self.store.put_back_turn(self._cid, removed.user, removed.reply)
            stored = removed.reply.id
            self._saw(version)
        self.chat.push_turn(removed.turn, removed.last_reply)
        self._ids.append(stored)

    # ----- the TurnLog the chat reports to -----------------------------------------------
    def started(self, text: str, plan: WindowPlan, *, continues: bool = False) -> Any:
        if continues:  # nothing is written until the continuation is complete
            return "continues"
        if self.store is None:
            return None
        cid = self.ensure()
        assert cid is not None
        engine = self.chat.engine
        tokens = engine.count_text(text) if engine.exact_counts else None
        written = self.store.start_turn(cid, text, tokens)
        self._saw(written.version)
        return written.id

    def completed(self, handle: Any, text: str, reply: Reply) -> int | None:
        """Store the turn (or the continuation); its name (None: not stored)."""
        self._retrying = None
        stored: int | None = None
        if handle == "continues":
            if self.store is not None and self._cid is not None:
                named = self._continuing
                written = self._stale_unless(lambda store, cid: store.extend_last_reply(
                    cid, reply.text, reply.usage.generated_tokens, usage_record(reply),
                    turn=named))
                stored = written.id
                self._saw(written.version)
            self._ids[-1:] = [stored]
            return stored
        if self.store is not None and handle is not None and self._cid is not None:
            stored = self._complete(handle, text, reply)
        self._ids.append(stored)
        return stored

    def _complete(self, handle: int, text: str, reply: Reply) -> int | None:
        assert self.store is not None and self._cid is not None
        tokens, usage = reply.usage.generated_tokens, usage_record(reply)
        # The memory (pins, summary) only if nobody else wrote since: else it is theirs.
        memory = self.memory_record() if self._version is not None else None
        try:
            written = self.store.complete_turn(self._cid, handle, reply.text, tokens, usage,
                                               memory=memory, seen=self._version,
                                               steps=reply.steps)
        except StoreError as exc:
            if exc.missing:
                raise
            # The reply exists; the database would not take it (locked too long): keep it in
            # a file that the next start saves, rather than lose it.
            kept = self.store.keep_for_later(self._cid, handle, text, reply.text, tokens, usage,
                                             reply.steps)
            log.warning("the conversation store was busy, so this turn was kept in %s; it is "
                        "saved the next time rolechat opens the store (%s)", kept, exc.reason)
            return None
        self._saw(written.version)
        return written.id

    def failed(self, handle: Any, partial: str = "") -> None:
        if self.store is not None and isinstance(handle, int):
            version = self.store.interrupt_turn(handle, partial)
            if version is not None:
                self._saw(version)
        self._put_back()

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

    def set_summarize(self, summarize: bool) -> None:
        """Make the window fold the turns it drops into the summary, or not (the memory mode
        ``summary`` or ``none``); saved with the conversation. The summary made so far stays;
        False makes no more of it."""
        chat = self.chat
        window = dataclasses.replace(chat.window, summarize=summarize)
        self._save(memory=self.memory_record(summarize=window.summarize))
        chat.window = window

    # ----- role and parameters -----------------------------------------------------------
    def _save(self, **fields: Any) -> None:
        if self.store is not None and self._cid is not None:
            self._saw(self.store.update(self._cid, **fields))
            self._stored.update({name: _plain(fields[name]) for name in SETTINGS
                                 if name in fields})

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
