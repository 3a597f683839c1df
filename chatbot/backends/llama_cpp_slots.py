"""Continuous batching over one llama.cpp context: up to n_seq conversations decoded in one batch per step.

One engine thread owns the context (a llama_context is not thread-safe). Each step it
  1. ends the sequences whose visitor pressed stop or went away (only theirs: the others go on),
  2. gives free sequences to waiting requests, in arrival order (a returning conversation's saved state is copied
     back into the sequence, trimmed to what its new prompt shares with it),
  3. decodes the last sampled token of every generating sequence in one llama_batch (the batching that makes
     four visitors cost little more than one), and samples each sequence's next token with its own sampler
     chain from its row of logits,
  4. decodes the next piece of each prompt still being read, shortest prompt left first: PREFILL_CHUNK tokens
     while anyone is generating, so a long prompt slows the others' streams instead of freezing them, else up to
     n_batch; prompts whose pieces are equally long share a llama_batch, the others have one each.
A prompt never shares a llama_batch with generating sequences or with a piece of another length: llama.cpp splits
such a batch into ubatches of other shapes, which round the prompt's KV cells differently (measured: next-token
logits up to 1.1 apart, of a 35-wide range), while these shapes give next-token logits bitwise equal to the request
alone (the embedded Q4_1 model and a Llama-3.2-1B-shaped q4_k_m; see SMALL_BATCH).
Requests arriving meanwhile wait for the next step. Each sequence's KV cells live in its own stream of the context
(llama.cpp's non-unified KV cache), so attention never mixes sequences, and one sequence never runs out of room
because of another.
"""
from __future__ import annotations

import ctypes
import queue
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import llama_cpp

from chatbot.backends.base import Chunk, cancelled
from chatbot.backends.llama_cpp_seq_cache import SavedSequence, SequenceCache, shared_prefix
from chatbot.backends.token_text import TextStream, token_piece

PREFILL_CHUNK = 64  # prompt tokens per sequence and step while others are generating (see docs/serving.md)
# llama.cpp's CPU matmul takes another code path for a batch of fewer than 8 rows with some weight types (measured
# on a q4_k_m: next-token logits up to 0.12 apart; none on the embedded Q4_1). The serial backend decodes a reply
# one row at a time and a prompt in n_batch chunks, so generating sequences are decoded at most 7 to a batch, and a
# prompt is cut so that none of its rows changes side (SlotScheduler.piece).
SMALL_BATCH = 8


class TokenChooser(Protocol):
    """Picks a sequence's next token from a row of the last batch's logits (a SequenceSampler, or a test's
    teacher forcing)."""

    def sample(self, ctx, row: int) -> int: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Job:
    """One request: its prompt tokens, how to choose tokens, and the queue its Chunks (or an exception) go to."""
    prompt: list[int]
    max_new_tokens: int
    chooser: TokenChooser
    stops: list[str] = field(default_factory=list)
    key: str | None = None                  # conversation key: saved state is reused only for the same key
    cancel: threading.Event | None = None   # the caller's stop button
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: bool = False                    # the caller went away (generator closed)
    reused: int = 0                         # prompt tokens that came from the saved state, not evaluated again
    keep_state: bool = True                 # False: no saved state is reused or kept (GenerationParams.keep_state)

    def stopped(self) -> bool:
        return self.closed or cancelled(self.cancel)


class Slot:
    """One llama.cpp sequence (seq_id = its index) and the job it is serving."""

    def __init__(self, seq: int):
        self.seq = seq
        self.job: Job | None = None
        self.tokens: list[int] = []    # tokens whose KV cells the sequence holds, from position 0
        self.pending: list[int] = []   # prompt tokens not evaluated yet
        self.next_token: int | None = None  # sampled, to be evaluated in the next step
        self.generated = 0
        self.unsent = 0                # tokens generated since the last chunk with text
        self.text: TextStream | None = None
        self.row: int | None = None    # this sequence's row of logits in the batch just decoded
        self.order = 0                 # when its job was admitted (ties between prompts of one length)
        self.tail = 0                  # prompt tokens the serial path reads as a last chunk under SMALL_BATCH


class SlotScheduler:
    def __init__(self, ctx, vocab, n_seq: int, n_batch: int, cache: SequenceCache | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.ctx, self.vocab, self.memory = ctx, vocab, llama_cpp.llama_get_memory(ctx)
        self.n_batch, self.prefill_chunk, self.cache = n_batch, prefill_chunk, cache
        self.slots = [Slot(i) for i in range(n_seq)]
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.waiting: deque[Job] = deque()
        self.admitted = 0
        self.wake = threading.Condition()
        self.running = True
        self.thread = threading.Thread(target=self.run, name="llama-cpp-slots", daemon=True)
        self.thread.start()

    # --- called from request threads -----------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self.wake:
            if not self.running:
                raise RuntimeError("the model has been closed")
            self.waiting.append(job)
            self.wake.notify()
        return job

    def close(self) -> None:
        """Stop the engine thread (requests still running end as cancelled) and free the batch."""
        with self.wake:
            self.running = False
            self.wake.notify()
        self.thread.join()
        for job in self.waiting:
            job.out.put(Chunk("", "cancelled"))
        self.waiting.clear()
        llama_cpp.llama_batch_free(self.batch)

    # --- the engine thread ---------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.waiting and not self.active():
                    self.wake.wait()
                if not self.running:
                    break
            try:
                self.step()
            except Exception as exc:  # a failed decode: every running request gets the error, the engine goes on
                traceback.print_exc(file=sys.stderr)
                for slot in self.active():
                    slot.job.out.put(exc)
                    self.release(slot)
        for slot in self.active():
            self.finish(slot, "cancelled")

    def active(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None]

    def step(self) -> None:
        for slot in self.active():
            if slot.job.stopped():
                self.finish(slot, "cancelled")
        self.admit()
        generating = [s for s in self.active() if s.next_token is not None]
        reading = sorted((s for s in self.active() if s.pending), key=lambda s: (len(s.pending), s.order))
        # While anyone is generating, a prompt advances PREFILL_CHUNK tokens a step; else up to n_batch at once.
        each = self.prefill_chunk if generating else self.n_batch
        groups = [(generating[i:i + SMALL_BATCH - 1], 1) for i in range(0, len(generating), SMALL_BATCH - 1)]
        # Prompts whose next pieces are equally long are read in one batch (llama.cpp computes each of their rows
        # as it would alone); others each in their own.
        same: dict[int, list[Slot]] = {}
        for slot in reading:
            same.setdefault(self.piece(slot, each), []).append(slot)
        for take, slots in same.items():  # short pieces stay under SMALL_BATCH rows together, as they are alone
            fit = max(1, (SMALL_BATCH - 1 if take < SMALL_BATCH else self.n_batch) // take)
            groups += [(slots[i:i + fit], take) for i in range(0, len(slots), fit)]
        for group, take in groups:
            self.fill_batch(group, take)
            code = llama_cpp.llama_decode(self.ctx, self.batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            for slot in group:
                if slot.row is not None:
                    self.take_token(slot, slot.job.chooser.sample(self.ctx, slot.row))

    def admit(self) -> None:
        with self.wake:
            while self.waiting and any(s.job is None for s in self.slots):
                job = self.waiting.popleft()
                if job.stopped():
                    job.out.put(Chunk("", "cancelled"))
                    continue
                self.begin(next(s for s in self.slots if s.job is None), job)
            for job in [j for j in self.waiting if j.stopped()]:  # stopped while waiting for a sequence
                self.waiting.remove(job)
                job.out.put(Chunk("", "cancelled"))

    def begin(self, slot: Slot, job: Job) -> None:
        slot.job, slot.tokens, slot.pending = job, [], list(job.prompt)
        slot.next_token, slot.generated, slot.unsent, slot.text = None, 0, 0, TextStream(job.stops)
        self.admitted += 1
        slot.order = self.admitted
        saved = self.cache.get(job.key) if self.cache is not None and job.keep_state else None
        if saved is not None:
            # At least the prompt's last token is evaluated again: its logits are what the first token comes from.
            keep = min(shared_prefix(saved.tokens, job.prompt), len(job.prompt) - 1)
            if keep > 0 and self.restore(slot.seq, saved, keep):
                slot.tokens, slot.pending, job.reused = job.prompt[:keep], job.prompt[keep:], keep
        short = len(slot.pending) % self.n_batch
        slot.tail = short if short < SMALL_BATCH else 0

    def restore(self, seq: int, saved: SavedSequence, keep: int) -> bool:
        data = ctypes.cast(ctypes.c_char_p(saved.state), ctypes.POINTER(ctypes.c_uint8))  # read in place, no copy
        if llama_cpp.llama_state_seq_set_data(self.ctx, data, len(saved.state), seq) == 0:
            llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
            return False
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq, keep, -1):  # a model whose memory cannot be cut
            llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
            return False
        return True

    def fill_batch(self, group: list[Slot], take: int) -> None:
        """Put one llama_decode call's tokens into self.batch: the next token of each generating sequence in
        `group`, or the next `take` tokens of each prompt (logits only for a prompt's last token)."""
        batch, n = self.batch, 0
        for slot in group:
            if slot.next_token is not None:
                tokens, slot.next_token = [slot.next_token], None
            else:
                tokens, slot.pending = slot.pending[:take], slot.pending[take:]
            slot.row = None
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1 and not slot.pending
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, len(slot.tokens), 1
                batch.seq_id[n][0], batch.logits[n] = slot.seq, last
                slot.tokens.append(token)
                if last:
                    slot.row = n
                n += 1
        batch.n_tokens = n

    def piece(self, slot: Slot, each: int) -> int:
        """How many prompt tokens to read now: up to `each`, cut so that every row is computed in a batch of the
        same kind (SMALL_BATCH rows or more, or fewer) as when the serial backend reads the prompt in n_batch chunks."""
        body = len(slot.pending) - slot.tail
        if body <= 0:
            return len(slot.pending)  # the serial path's own short last chunk
        take = min(each, body)
        if body - take >= SMALL_BATCH:
            return take
        # What would be left is under SMALL_BATCH rows: read it now too, unless that overflows the batch (a prompt
        # that began while others were generating can have n_batch + 1..7 left): then leave SMALL_BATCH for later.
        return body if body <= self.n_batch else body - SMALL_BATCH

    def take_token(self, slot: Slot, token: int) -> None:
        job = slot.job
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self.finish(slot, "stop")
            return
        slot.generated += 1
        slot.unsent += 1
        text = slot.text.push(token_piece(self.vocab, token))
        if text:
            job.out.put(Chunk(text, tokens=slot.unsent))
            slot.unsent = 0
        if slot.text.stopped:
            self.finish(slot, "stop")
        elif slot.generated >= job.max_new_tokens:
            self.finish(slot, "length")
        else:
            slot.next_token = token

    def finish(self, slot: Slot, reason: str) -> None:
        job = slot.job
        if reason != "cancelled":
            text = slot.text.flush()
            if text or slot.unsent:
                job.out.put(Chunk(text, tokens=slot.unsent))
        if self.cache is not None and slot.tokens and job.keep_state:
            self.cache.put(job.key, SavedSequence(tuple(slot.tokens), self.save(slot.seq)))
        job.out.put(Chunk("", reason))
        self.release(slot)

    def save(self, seq: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq)
        return bytes(memoryview(buf)[:n])

    def release(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        slot.job.chooser.close()
        slot.job, slot.tokens, slot.pending, slot.next_token, slot.row = None, [], [], None, None
