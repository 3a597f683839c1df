"""The replies this server streamed, per browser session: what a feedback record is checked against.

A rating, a retry or a kept reply names a reply by the conversation the page sends back. The server keeps, for each
reply it streamed, only a digest of that conversation and reply plus how it was generated (system prompt, sampling
settings with the seed, how many of the oldest messages the model did not see), so it can vouch for the record and
write the settings the reply really had. The conversation text itself is not kept: it comes back with the event and
must match the digest. Bounded: MAX_REPLIES_PER_SESSION replies a session (the oldest forgotten first), sessions in a
SessionStore (idle an hour, most MAX_SESSIONS, MAX_BYTES in all).
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from chatbot.backends.base import GenerationParams

MAX_REPLIES_PER_SESSION = 256  # replies of one session that can still be rated
MAX_SESSIONS = 10_000          # sessions remembered; the least recently used are forgotten first
MAX_BYTES = 64 * 2**20         # all sessions' ledgers together, counted as below
IDLE_SECONDS = 3600            # a session unused for an hour is forgotten (Gradio keeps its own state as long)
REPLY_BYTES = 1024             # counted per reply besides its system prompt: digests, settings, Python overhead


def digest(messages: list[dict], reply: str | None = None) -> bytes:
    """A 128-bit digest of normalised messages (and the reply after them, if given)."""
    text = json.dumps([messages, reply], ensure_ascii=False, sort_keys=True, allow_nan=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def sampling(p: GenerationParams) -> dict:
    """The sampling settings a record keeps for a reply generated with `p`, the seed included."""
    return {"temperature": p.temperature, "top_p": p.top_p, "max_new_tokens": p.max_new_tokens,
            "repeat_penalty": p.repeat_penalty, "min_p": p.min_p, "seed": p.seed}


@dataclass(frozen=True)
class Served:
    """How one streamed reply was generated."""
    system_prompt: str
    params: GenerationParams
    dropped: int   # leading conversation messages the model did not see (history and context limits)
    prompt: bytes  # digest of the conversation before the reply

    @property
    def nbytes(self) -> int:
        return REPLY_BYTES + len(self.system_prompt.encode("utf-8", "surrogatepass"))

    def sampling(self) -> dict:
        """The sampling settings the reply was generated with, the seed included."""
        return sampling(self.params)


@dataclass
class SessionLedger:
    """One browser session: its random conversation id for records, the replies it was served, the turns it
    regenerated and not yet went on from, and the record bytes it has written."""
    conversation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    served: OrderedDict[bytes, Served] = field(default_factory=OrderedDict)
    retried: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    written: int = 0

    def add(self, key: bytes, served: Served) -> int:
        """Remember a reply; the change in counted bytes (the oldest replies beyond the bound are forgotten)."""
        delta = served.nbytes - (self.served.pop(key).nbytes if key in self.served else 0)
        self.served[key] = served
        while len(self.served) > MAX_REPLIES_PER_SESSION:
            delta -= self.served.popitem(last=False)[1].nbytes
        return delta

    def mark_retried(self, prompt: bytes) -> None:
        self.retried[prompt] = None
        while len(self.retried) > MAX_REPLIES_PER_SESSION:
            self.retried.popitem(last=False)
