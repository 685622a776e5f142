"""Every ``rolechat`` command: importing this module registers them all on the group."""

from . import ask, chat, conversations, models, personas, prompt, pull, serve

__all__ = ["ask", "chat", "conversations", "models", "personas", "prompt", "pull", "serve"]
