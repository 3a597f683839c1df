"""Per-browser-session state kept on the server, always bounded: a session idle for `idle_seconds` is dropped, and
beyond `max_sessions` sessions or `max_bytes` (what the owner of the state charges for it) the least recently used
sessions go first. Not thread-safe: the caller holds its own lock around every call."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

S = TypeVar("S")


@dataclass
class _Entry(Generic[S]):
    state: S
    used: float
    nbytes: int = 0


class SessionStore(Generic[S]):
    def __init__(self, new: Callable[[], S], *, max_sessions: int, max_bytes: int, idle_seconds: float,
                 clock: Callable[[], float] = time.monotonic):
        self.new, self.clock = new, clock
        self.max_sessions, self.max_bytes, self.idle_seconds = max_sessions, max_bytes, idle_seconds
        self.entries: OrderedDict[str, _Entry[S]] = OrderedDict()  # least recently used first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        self.expire()
        return key in self.entries

    def use(self, key: str) -> S:
        """The session's state (a new one if it had none, or had expired), marked as just used."""
        self.expire()
        entry = self.entries.pop(key, None) or _Entry(self.new(), 0.0)
        entry.used = self.clock()
        self.entries[key] = entry
        self._evict(keep=key)
        return entry.state

    def charge(self, key: str, nbytes: int) -> None:
        """Count `nbytes` more (or fewer, when negative) against the session's share of max_bytes."""
        entry = self.entries.get(key)
        if entry is None:
            return
        entry.nbytes += nbytes
        self.nbytes += nbytes
        self._evict(keep=key)

    def drop(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def expire(self) -> None:
        cutoff = self.clock() - self.idle_seconds
        while self.entries:
            key, entry = next(iter(self.entries.items()))
            if entry.used >= cutoff:
                break
            self.drop(key)

    def _evict(self, keep: str) -> None:
        while len(self.entries) > self.max_sessions or (self.nbytes > self.max_bytes and len(self.entries) > 1):
            key = next(iter(self.entries))
            if key == keep:  # the session being served is the most recent; only others are evicted
                break
            self.drop(key)
