"""rolechat: multi-turn chat with a local language model — personas, history, a sliding window
and KV-cache reuse, on a real model.

Public API (everything else is internal)::

    from rolechat import Chat, load_engine
    chat = Chat(load_engine(), persona="expert")
    print(chat.send("Why is the sky blue?").text)

    from rolechat import inference, chat_turn     # the seed tutorial's functions
"""

from __future__ import annotations

#: Not ``typing.TYPE_CHECKING``: importing typing alone takes a while (see _PUBLIC).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .chat import Chat, Reply, ReplyStream, chat_turn, inference
    from .conversation import Conversation, Message, Turn
    from .engines import Engine, load_engine
    from .engines.base import Completion, Usage
    from .errors import (
        ContextOverflow,
        InvalidInput,
        InvalidParams,
        ModelLoadError,
        PullError,
        RolechatError,
        UnknownName,
    )
    from .params import GenerationParams
    from .persona import Persona, get_persona, load_personas
    from .pulling import pull
    from .window import Window, WindowPlan

#: Where each public name lives. A name is imported when it is first used, so ``import
#: rolechat`` itself imports nothing: the ``rolechat`` command starts with its own code, which
#: can then handle Ctrl-C pressed while the rest is still being imported.
_PUBLIC = {
    **dict.fromkeys(("Chat", "Reply", "ReplyStream", "chat_turn", "inference"), "chat"),
    **dict.fromkeys(("Conversation", "Message", "Turn"), "conversation"),
    **dict.fromkeys(("Engine", "load_engine"), "engines"),
    **dict.fromkeys(("Completion", "Usage"), "engines.base"),
    **dict.fromkeys(("ContextOverflow", "InvalidInput", "InvalidParams", "ModelLoadError",
                     "PullError", "RolechatError", "UnknownName"), "errors"),
    "GenerationParams": "params",
    **dict.fromkeys(("Persona", "get_persona", "load_personas"), "persona"),
    **dict.fromkeys(("Window", "WindowPlan"), "window"),
    "pull": "pulling",
}


def __getattr__(name: str) -> Any:
    import importlib

    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__version__ = "0.1.0"

__all__ = [
    "Chat", "Completion", "ContextOverflow", "Conversation", "Engine", "GenerationParams",
    "InvalidInput", "InvalidParams", "Message", "ModelLoadError", "Persona", "PullError",
    "Reply", "ReplyStream", "RolechatError", "Turn", "UnknownName", "Usage", "Window",
    "WindowPlan", "chat_turn", "get_persona", "inference", "load_engine", "load_personas",
    "pull",
]
