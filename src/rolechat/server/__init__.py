"""rolechat's HTTP server (the ``[server]`` extra): see :mod:`rolechat.server.app`."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
