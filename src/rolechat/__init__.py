"""rolechat: multi-turn chat with a local language model — personas, history, a sliding window
and KV-cache reuse, on a real model.

Public API (everything else is internal)::

    from rolechat import Chat, load_engine
    chat = Chat(load_engine(), persona="expert")
    print(chat.send("Why is the sky blue?").text)

    from rolechat import inference, chat_turn     # the seed tutorial's functions
"""

from .chat import Chat, Reply, ReplyStream, chat_turn, inference
from .conversation import Conversation, Message, Turn
from .engines import Engine, load_engine
from .engines.base import Completion, Usage
from .errors import (
    ContextOverflow,
    InvalidInput,
    InvalidParams,
    ModelLoadError,
    RolechatError,
    UnknownName,
)
from .params import GenerationParams
from .persona import Persona, get_persona, load_personas
from .window import Window, WindowPlan

__version__ = "0.1.0"

__all__ = [
    "Chat", "Completion", "ContextOverflow", "Conversation", "Engine", "GenerationParams",
    "InvalidInput", "InvalidParams", "Message", "ModelLoadError", "Persona", "Reply",
    "ReplyStream", "RolechatError", "Turn", "UnknownName", "Usage", "Window", "WindowPlan",
    "chat_turn", "get_persona", "inference", "load_engine", "load_personas",
]
