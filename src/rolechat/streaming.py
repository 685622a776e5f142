"""Turning a stream of token bytes into safe text chunks.

Contract: :class:`ReplyText` takes the bytes of each generated token and returns the text that
may be shown *now*:
- never half a UTF-8 character: bytes are held back until they decode (invalid bytes become
  U+FFFD), and a character left incomplete when the reply ends (cut by max_new_tokens) is
  dropped rather than shown as U+FFFD;
- never any part of a stop sequence: text that could be the start of a stop string is held back
  until it is known not to be one, and the reply ends at the first stop string (which is not
  part of the reply).
``text`` is everything emitted so far; after :meth:`finish` it is the whole reply.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class ReplyText:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded text that might still turn into a stop string
        self.text = ""
        self.stopped = False  # a stop sequence was found

    def _release(self, final: bool) -> str:
        held = self._held
        cut = min((i for i in (held.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = held[:cut], ""
        elif final or not self._stop:
            out, self._held = held, ""
        else:
            keep = 0  # the longest tail of `held` that begins some stop string
            for k in range(min(len(held), max(map(len, self._stop)) - 1), 0, -1):
                if any(s.startswith(held[-k:]) for s in self._stop):
                    keep = k
                    break
            out, self._held = (held[:-keep], held[-keep:]) if keep else (held, "")
        self.text += out
        return out

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that is safe to show now ('' if none)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of reply: return whatever was held back that is not part of a stop string."""
        if self.stopped:
            return ""
        self._decoder.reset()  # drop the bytes of a character the reply never finished
        return self._release(final=True)
