"""The Arena: one prompt, the replies of two models side by side as A and B in random order, one vote.

CHATBOT_ARENA_MODEL names the second model; it is served by the same backend kind as the chat and both are loaded
once at start-up (app.py). A battle sends the visitor's message through the chat's bounds (CHATBOT_MAX_INPUT_CHARS,
each model's context, checked before anything is generated), with the server's system prompt and sampling settings
and a fresh seed per side, to both models at the same moment: each decodes in its own thread and both replies
stream as they come (the llama_cpp backend batches each with that model's other requests).

A vote is accepted once, and only for a battle this server ran in that browser session: the server keeps each
finished battle (the prompt, both replies, which model was A) in the session's ledger until the vote, so nothing a
caller sends but the battle id and the choice is trusted. Bounded: MAX_BATTLES_PER_SESSION battles awaiting a vote
a session (the oldest forgotten first), the last MAX_VOTED ids voted on, sessions in a SessionStore (idle an hour,
at most MAX_SESSIONS, MAX_BYTES in all). A vote becomes a record (chatbot/arena_record.py) only when feedback
storage is on (CHATBOT_FEEDBACK_DIR / CHATBOT_FEEDBACK_DATASET), within the feedback records' limits.
"""
from __future__ import annotations

import contextvars
import queue
import secrets
import sys
import threading
import traceback
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from chatbot.arena_record import LABELS, VOTES, served_model, vote_record
from chatbot.backends.base import Backend, GenerationParams, fresh_seed
from chatbot.feedback import FeedbackCollector
from chatbot.history import build_messages, content_text, trim
from chatbot.reply import notice, refuse_message, shown, stream_reply, too_long
from chatbot.served_replies import IDLE_SECONDS, MAX_SESSIONS, sampling
from chatbot.session_store import SessionStore
from chatbot.settings import Settings, arena_settings

MAX_BATTLES_PER_SESSION = 16  # finished battles of one session still waiting for a vote
MAX_VOTED = 256               # battle ids a session voted on, remembered to answer a repeat
MAX_BYTES = 64 * 2**20        # all sessions' ledgers together
BATTLE_BYTES = 2048           # counted per battle besides its texts: model descriptions, settings, Python overhead
VOTED_BYTES = 100             # counted per battle id voted on
MAX_ID_CHARS = 64             # a longer battle id is refused before it is looked up
FAILED = notice("The model failed")  # what stream_reply puts in a reply whose backend raised

ASKING = "Both models are answering…"
ASK_VOTE = "Which reply is better? Vote below; the models' names are shown after your vote."


@dataclass(frozen=True)
class Contender:
    backend: Backend
    model: dict  # chatbot.arena_record.served_model: name, backend, model, file, adapter, revision


@dataclass(frozen=True)
class Side:
    model: dict
    reply: str
    sampling: dict


@dataclass(frozen=True)
class Battle:
    messages: list[dict]     # the prompt both models answered: system prompt (if any) and the message
    sides: tuple[Side, Side]  # A, B

    @property
    def nbytes(self) -> int:
        texts = [m["content"] for m in self.messages] + [s.reply for s in self.sides]
        return BATTLE_BYTES + sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


@dataclass
class ArenaLedger:
    """One browser session's battles awaiting a vote, and the ids it has voted on."""
    battles: OrderedDict[str, Battle] = field(default_factory=OrderedDict)
    voted: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def add(self, battle_id: str, battle: Battle) -> int:
        """Keep a finished battle; the change in counted bytes (the oldest beyond the bound are forgotten)."""
        self.battles[battle_id] = battle
        delta = battle.nbytes
        while len(self.battles) > MAX_BATTLES_PER_SESSION:
            delta -= self.battles.popitem(last=False)[1].nbytes
        return delta

    def take(self, battle_id: str) -> tuple[Battle | None, int]:
        """The battle, once: it is marked voted (bounded) and forgotten. (battle or None, change in counted bytes)."""
        battle = self.battles.pop(battle_id, None)
        if battle is None:
            return None, 0
        self.voted[battle_id] = None
        delta = VOTED_BYTES - battle.nbytes
        while len(self.voted) > MAX_VOTED:
            self.voted.popitem(last=False)
            delta -= VOTED_BYTES
        return battle, delta


def stream_both(jobs: list[tuple[Backend, GenerationParams]], messages: list[dict]) -> Iterator[list[str]]:
    """Every reply so far, as they stream: each backend decodes in a thread of its own, all at the same time.
    Closing the generator ends them all at their next token."""
    items: queue.SimpleQueue = queue.SimpleQueue()
    cancels = [threading.Event() for _ in jobs]  # one each: a reply that ends sets its own

    def run(i: int, backend: Backend, params: GenerationParams) -> None:
        try:
            for text, _ in stream_reply(backend, messages, params, cancel=cancels[i]):
                items.put((i, text))
        except Exception:  # stream_reply shows a backend's own errors in the reply; anything else goes to the log
            traceback.print_exc(file=sys.stderr)
        finally:
            items.put((i, None))

    # In a copy of the caller's context each, as stream_reply's producer: ZeroGPU reads the visitor's request there.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, i, *job), name="arena-side",
                                daemon=True) for i, job in enumerate(jobs)]
    texts, running = [""] * len(jobs), len(jobs)
    for t in threads:
        t.start()
    try:
        while running:
            batch = [items.get()]
            while True:  # what else has arrived: one update for all of it
                try:
                    batch.append(items.get_nowait())
                except queue.Empty:
                    break
            for i, text in batch:
                if text is None:
                    running -= 1
                else:
                    texts[i] = text
            yield list(texts)
    finally:
        for cancel in cancels:
            cancel.set()
        for t in threads:
            t.join()


class Arena:
    """Battles and votes over two loaded backends: the chat's model and CHATBOT_ARENA_MODEL's."""

    def __init__(self, settings: Settings, first: Backend, second: Backend,
                 collector: FeedbackCollector | None = None):
        self.settings, self.collector = settings, collector
        self.contenders = (Contender(first, served_model(settings, first)),
                           Contender(second, served_model(arena_settings(settings), second)))
        self.lock = threading.Lock()
        self.sessions: SessionStore[ArenaLedger] = SessionStore(
            ArenaLedger, max_sessions=MAX_SESSIONS, max_bytes=MAX_BYTES, idle_seconds=IDLE_SECONDS)
        self.refused = 0  # votes naming a battle this server did not run in that session (or no longer remembers)

    @property
    def max_concurrency(self) -> int:
        """Battles at once: each holds a request of both backends."""
        return min(c.backend.max_concurrency for c in self.contenders)

    def params(self) -> GenerationParams:
        """The server's sampling settings, one reply length both models can give, a fresh seed (unless CHATBOT_SEED)."""
        s = self.settings
        longest = min([s.max_new_tokens] + [c.backend.n_ctx - 1 for c in self.contenders])
        return GenerationParams(max_new_tokens=longest, temperature=s.temperature, top_p=s.top_p, min_p=s.min_p,
                                repeat_penalty=s.repeat_penalty, seed=s.seed)

    def fight(self, message: Any, session: str | None) -> Iterator[tuple[str, str, str, str]]:
        """(battle id, reply A, reply B, status line) while both replies stream. The battle id comes once both are
        done (it is what vote() takes); a message refused before the models, or a failed model, gives none."""
        text = content_text(message["text"] if isinstance(message, dict) and "text" in message else message)
        refused = refuse_message(self.settings, text)
        if refused is not None:
            yield "", "", "", refused
            return
        messages = build_messages(self.settings.system_prompt, [], text)
        params = self.params()
        for c in self.contenders:
            if trim(messages, c.backend.count_tokens, c.backend.n_ctx, params.max_new_tokens) is None:
                yield "", "", "", too_long(c.backend, messages, params.max_new_tokens)
                return
        params = replace(params, keep_state=False)  # the chat's cached conversations stay, and neither side is
        #                                             sped up by state an earlier request left (which would tell it)
        order = list(self.contenders) if secrets.randbelow(2) == 0 else list(self.contenders)[::-1]
        jobs = [(c.backend, params if params.seed is not None else replace(params, seed=fresh_seed()))
                for c in order]
        replies = ["", ""]
        yield "", "", "", ASKING
        with closing(stream_both(jobs, messages)) as streams:  # closed at once when the visitor goes away
            for replies in streams:
                yield "", replies[0], replies[1], ASKING
        if any(FAILED in r for r in replies):
            yield "", replies[0], replies[1], notice("A model failed, so there is nothing to vote on. "
                                                     "Please try again.")
            return
        if not session:
            yield "", replies[0], replies[1], notice("Votes need a session (this call had none).")
            return
        battle = Battle(messages, tuple(Side(c.model, reply, sampling(p))
                                        for c, (_, p), reply in zip(order, jobs, replies)))
        battle_id = secrets.token_hex(16)
        with self.lock:
            ledger = self.sessions.use(session)
            self.sessions.charge(session, ledger.add(battle_id, battle))
        yield battle_id, replies[0], replies[1], ASK_VOTE

    def vote(self, session: str | None, battle_id: Any, choice: Any) -> str:
        """Count a vote (A, B, tie, both_bad) on a battle of this session, once; the line the page shows: the models'
        names, and whether the vote was saved."""
        if choice not in VOTES:
            return notice(f"choice={shown(choice)} is not valid; accepted: {', '.join(VOTES)}.")
        if not isinstance(battle_id, str) or not battle_id or len(battle_id) > MAX_ID_CHARS or not session:
            return self.refuse()
        with self.lock:
            ledger = self.sessions.use(session) if session in self.sessions else None  # a stranger gets no state
            repeated = ledger is not None and battle_id in ledger.voted
            battle, delta = ledger.take(battle_id) if ledger is not None and not repeated else (None, 0)
            if battle is not None:
                self.sessions.charge(session, delta)
        if repeated:
            return notice("This battle's vote was already counted; a battle takes one vote.")
        if battle is None:
            return self.refuse()
        replies = [{"label": label, "model": side.model, "reply": side.reply, "sampling": side.sampling}
                   for label, side in zip(LABELS, battle.sides)]
        reveal = f"A was **{battle.sides[0].model['name']}**, B was **{battle.sides[1].model['name']}**."
        if self.collector is None:
            return f"{reveal} Thank you for voting (votes are not saved on this server)."
        unsaved = self.collector.write(session, vote_record(battle_id, battle.messages, replies, choice), "vote")
        return f"{reveal} Thank you: your vote is saved." if unsaved is None else f"{reveal}\n\n{unsaved}"

    def refuse(self) -> str:
        with self.lock:
            self.refused += 1
            count = self.refused
        if count in (1, 10) or count % 100 == 0:
            print(f"arena: {count} votes refused so far (a battle this server did not run in that session, or one it "
                  "no longer remembers); nothing was written for them", file=sys.stderr)
        return notice(f"That vote was not counted: this server did not run that battle in this session (it keeps "
                      f"the last {MAX_BATTLES_PER_SESSION} battles of a session for an hour).")
