"""Exponential backoff: how long to wait before the next retry of something that keeps failing."""

from __future__ import annotations


class Backoff:
    """``first``, then doubling up to ``maximum``; :meth:`reset` after a success."""

    def __init__(self, first: float, maximum: float):
        self.first = first
        self.maximum = maximum
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.first
