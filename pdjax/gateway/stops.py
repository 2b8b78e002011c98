"""Stop strings, matched on the text as it streams (as vLLM's frontend does).

The router stops on token ids only; a stop *string* can span several
tokens and several stream messages, so the gateway matches it on the
accumulated text. Text that might be the start of a stop string (the last
``len(longest stop) - 1`` characters) is held back until the next delta
settles it, so a stop string split across deltas never reaches the client.
On a match the output ends just before the stop string, or with it where
the request asked for it (vLLM's ``include_stop_str_in_output``), with
finish reason "stop"; of several stop strings, the one whose last
character arrives first wins.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
  """Feeds text deltas; releases the text that is certainly output."""

  def __init__(self, stops: Sequence[str], include_stop: bool = False):
    self._stops = tuple(stops)
    self._include_stop = include_stop
    self._hold = max((len(s) for s in self._stops), default=1) - 1
    self._text = ""
    self._released = 0      # self._text[:_released] went to the client
    self.stopped = False

  def push(self, delta: str, match: bool = True) -> str:
    """Adds a delta; returns the text now safe to release.

    Sets ``stopped`` when a stop string completed: the returned text then
    ends right before it (with it, ``include_stop``), and nothing more is
    ever released. ``match=False``: the delta is output as it is, no stop
    string matched in it (the tokens before a request's ``min_tokens``, as
    vLLM does).
    """
    if self.stopped:
      return ""
    if not match:
      self._text += delta
      return self._take(len(self._text))
    # A match that ends in the new text starts no earlier than this; any
    # earlier one would have been found by an earlier push.
    start = max(self._released, len(self._text) - self._hold)
    self._text += delta
    # The stop string that completes first (then the longer one), as a
    # scan character by character would find it: the result does not
    # depend on how the text was split into deltas.
    hits = [(i + len(s), i) for s in self._stops
            if (i := self._text.find(s, start)) >= 0]
    if hits:
      self.stopped = True
      end, start = min(hits)
      return self._take(end if self._include_stop else start)
    return self._take(max(self._released, len(self._text) - self._hold))

  def flush(self) -> str:
    """The held-back text, at the end of a stream no stop string ended."""
    return "" if self.stopped else self._take(len(self._text))

  def _take(self, end: int) -> str:
    out = self._text[self._released:end]
    self._released = end
    return out


__all__ = ["StopMatcher"]
