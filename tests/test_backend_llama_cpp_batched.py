"""The batched llama_cpp path (CHATBOT_PARALLEL > 1) on the real embedded SmolLM2: several conversations in one
llama.cpp batch get what they get alone (logits, greedy replies, sampled replies for a seed), the stop button ends
only its own sequence, each conversation's prompt cache is its own, and trimming, the repetition penalty and min-p
work per sequence."""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import llama_cpp
import numpy as np
import pytest

from chatbot.backends import GenerationParams, load_backend
from chatbot.backends.llama_cpp import LlamaCppBackend
from chatbot.backends.llama_cpp_batched import BatchedLlamaCppBackend
from chatbot.backends.llama_cpp_sampler import SequenceSampler
from chatbot.backends.llama_cpp_slots import PREFILL_CHUNK, SMALL_BATCH, Job, Slot
from chatbot.history import trim
from chatbot.settings import ConfigError, load_settings

THREADS = {"CHATBOT_THREADS": "1"}  # see test_backend_llama_cpp.py: one thread on a shared CI machine
SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}]
CONVERSATIONS = [
    [{"role": "user", "content": "Explain what rain is."}],
    [{"role": "user", "content": "How is bread made?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers in Europe."}],
    # Longer than PREFILL_CHUNK: read in chunks while the others generate.
    [{"role": "user", "content": "Summarise this: " + "The quick brown fox jumps over the lazy dog while the cat "
                                                      "watches from the window. " * 12}],
]
GREEDY = GenerationParams(max_new_tokens=24, temperature=0, repeat_penalty=1.2)  # the app's default penalty
# Logits may differ where llama.cpp sums in another order for another batch shape; allowed: 1e-4 of the largest
# |logit|. Measured on this model and CPU: 0, every row bitwise equal (with a prompt mixed into the generating
# sequences' batch instead: up to 1.1, see llama_cpp_slots.py). A near-tie: top two within NEAR_TIE.
LOGIT_TOLERANCE = 1e-4
NEAR_TIE = 0.05


def settings(parallel: int, **env: str):
    return load_settings({"CHATBOT_N_CTX": "1024", "CHATBOT_CACHE_MB": "0", "CHATBOT_PARALLEL": str(parallel),
                          **THREADS, **env})


@pytest.fixture(scope="module")
def batched():
    backend = load_backend(settings(4))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def serial():
    """Today's serial path on the same model: the 'same request alone' every comparison is against."""
    return load_backend(settings(1))


def logits_row(ctx, row: int, n_vocab: int) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(n_vocab,)).copy()


def alone(serial, prompt: list[int], params: GenerationParams, n: int) -> tuple[list[int], list[np.ndarray]]:
    """Tokens and the logits each came from, for `prompt` alone through llama-cpp-python's Llama (as the serial
    backend generates: prompt in one n_batch eval, then one token per eval, the same sampler chain)."""
    llm, tokens, rows = serial.llm, [], []
    llm.reset()
    for token in llm.generate(prompt, top_k=40, top_p=params.top_p, min_p=params.min_p, temp=params.temperature,
                              repeat_penalty=params.repeat_penalty):
        rows.append(logits_row(llm.ctx, -1, llm.n_vocab()))
        if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token) or len(tokens) == n:
            break
        tokens.append(token)
    return tokens, rows[:len(tokens)]


class Recorder:
    """A TokenChooser that records the logits row of every step and takes its tokens from `forced` (teacher
    forcing) or from the real sampler chain."""

    def __init__(self, backend, forced: list[int] | None = None, params: GenerationParams = GREEDY):
        self.n_vocab, self.forced = backend.n_vocab, forced
        self.sampler = SequenceSampler(params, backend.n_vocab)
        self.rows: list[np.ndarray] = []
        self.tokens: list[int] = []
        self.stepped = threading.Condition()

    def sample(self, ctx, row: int) -> int:
        self.rows.append(logits_row(ctx, row, self.n_vocab))
        token = self.sampler.sample(ctx, row) if self.forced is None else self.forced[len(self.tokens)]
        with self.stepped:
            self.tokens.append(token)
            self.stepped.notify_all()
        return token

    def wait_for(self, steps: int) -> None:
        with self.stepped:
            assert self.stepped.wait_for(lambda: len(self.tokens) >= steps, timeout=120)

    def close(self) -> None:
        self.sampler.close()


def record_batches(backend) -> list[dict[int, tuple[int, int]]]:
    """Each llama_decode call's batch as {seq: (tokens in the batch, rows with logits)}."""
    batches, scheduler = [], backend.scheduler
    original = scheduler.fill_batch

    def fill_batch(*args) -> None:
        original(*args)
        b, shape = scheduler.batch, {}
        for i in range(b.n_tokens):
            n, rows = shape.get(b.seq_id[i][0], (0, 0))
            shape[b.seq_id[i][0]] = (n + 1, rows + bool(b.logits[i]))
        batches.append(shape)

    scheduler.fill_batch = fill_batch
    return batches


def run_staggered(backend, prompts: list[list[int]], choosers: list[Recorder], n: int,
                  join_after: dict[int, int]) -> None:
    """Start prompt 0, then start prompt k once prompt 0 has taken join_after[k] tokens (mid-stream); wait for all."""
    jobs = [backend.scheduler.submit(Job(prompts[0], n, choosers[0]))]
    for k in range(1, len(prompts)):
        choosers[0].wait_for(join_after[k])
        jobs.append(backend.scheduler.submit(Job(prompts[k], n, choosers[k])))
    for job in jobs:
        while not drain_one(job).finish_reason:
            pass


def drain_one(job: Job):
    item = job.out.get(timeout=120)
    if isinstance(item, Exception):
        raise item
    return item


def prompt_tokens(backend, messages: list[dict]) -> list[int]:
    return backend.tokenize(backend.formatter(messages=messages).prompt)


def test_logits_equal_the_request_alone_when_interleaved_and_joining_mid_stream(batched, serial):
    prompts = [prompt_tokens(batched, m) for m in CONVERSATIONS]
    assert len(prompts[3]) > 2 * PREFILL_CHUNK and all(len(p) < PREFILL_CHUNK for p in prompts[:3])
    references = [alone(serial, p, GREEDY, 24) for p in prompts]  # teacher forcing: each reply as it comes alone
    recorders = [Recorder(batched, forced=tokens) for tokens, _ in references]
    batches = record_batches(batched)
    try:
        run_staggered(batched, prompts, recorders, 24, join_after={1: 3, 2: 8, 3: 8})
    finally:
        del batched.scheduler.fill_batch
    # The scenario really happened: sequences joined while others generated (up to four in one batch), and the
    # long prompt was read in PREFILL_CHUNK pieces, with the others' next tokens decoded between them.
    assert max(len(shape) for shape in batches) == 4
    chunks = [i for i, shape in enumerate(batches) if list(shape.values()) == [(PREFILL_CHUNK, 0)]]
    assert len(chunks) >= 2 and all(len(batches[i + 1]) >= 2 for i in chunks)
    bitwise = 0
    for recorder, (tokens, rows) in zip(recorders, references):
        assert recorder.tokens == tokens and len(recorder.rows) == len(rows) == 24
        for got, ref in zip(recorder.rows, rows):
            scale = float(np.abs(ref).max())
            assert float(np.abs(got - ref).max()) <= LOGIT_TOLERANCE * scale
            bitwise += bool(np.array_equal(got, ref))
    print(f"next-token logits bitwise equal to the request alone: {bitwise} of {24 * len(prompts)} steps")


def test_a_short_question_is_not_stuck_behind_a_long_prompt(batched):
    """While someone generates, prompts are read PREFILL_CHUNK tokens a step, shortest left first."""
    firsts: list[str] = []

    class First(Recorder):
        def __init__(self, name: str):
            super().__init__(batched)
            self.name = name

        def sample(self, ctx, row: int) -> int:
            if not self.tokens:
                firsts.append(self.name)
            return super().sample(ctx, row)

    generating = First("generating")
    long_prompt = prompt_tokens(batched, [{"role": "user", "content": "Summarise: " + "The committee met to "
                                                                      "discuss the budget. " * 60}])
    short_prompt = prompt_tokens(batched, SYSTEM + [{"role": "user", "content": "Hi!"}])
    assert len(long_prompt) > 6 * PREFILL_CHUNK > 6 * len(short_prompt)
    jobs = [batched.scheduler.submit(Job(prompt_tokens(batched, CONVERSATIONS[0]), 40, generating))]
    generating.wait_for(2)
    with batched.scheduler.wake:  # both arrive between two steps, the long one first
        jobs += [batched.scheduler.submit(Job(long_prompt, 2, First("long"))),
                 batched.scheduler.submit(Job(short_prompt, 2, First("short")))]
    for job in jobs:
        while not drain_one(job).finish_reason:
            pass
    assert firsts == ["generating", "short", "long"]


def test_rows_stay_on_the_serial_paths_side_of_llama_cpps_small_batch_kernels():
    """Some weight types (k-quants) take another matmul path below SMALL_BATCH rows (measured on a 1B-shaped
    q4_k_m: logits 0.12 apart). A prompt is never cut into a piece that small unless the serial path's own last
    n_batch chunk is, and generating sequences are decoded at most SMALL_BATCH - 1 to a batch."""
    backend = load_backend(settings(9, CHATBOT_N_CTX="2048"))
    try:
        batches = record_batches(backend)
        generating = [Recorder(backend) for _ in range(8)]
        jobs = [backend.scheduler.submit(Job(prompt_tokens(backend, SYSTEM + [{"role": "user", "content": f"Hi {i}"}]),
                                             40, recorder)) for i, recorder in enumerate(generating)]
        for recorder in generating:
            recorder.wait_for(2)
        before = len(batches)
        # The serial path reads 129 prompt tokens in one batch, and 515 as 512 + 3.
        jobs += [backend.scheduler.submit(Job(list(range(1000, 1000 + n)), 1, Recorder(backend))) for n in (129, 515)]
        for job in jobs:
            while not drain_one(job).finish_reason:
                pass
        pieces = [shape[8][0] for shape in batches[before:] if 8 in shape]
        assert pieces[:2] == [64, 65] and pieces[-1] == 3 and sum(pieces) == 129 + 515  # never [64, 64, 1]
        # Short pieces of several prompts together stay under SMALL_BATCH rows too.
        before = len(batches)
        with backend.scheduler.wake:  # three 3-token prompts arrive together
            jobs = [backend.scheduler.submit(Job(list(range(2000 + 10 * i, 2003 + 10 * i)), 1, Recorder(backend)))
                    for i in range(3)]
        for job in jobs:
            while not drain_one(job).finish_reason:
                pass
        assert [sum(n for n, _ in shape.values()) for shape in batches[before:]] == [6, 3]
        assert all(n >= SMALL_BATCH for n in pieces[:-1])
        next_tokens = [shape for shape in batches if set(shape.values()) == {(1, 1)}]
        assert max(len(shape) for shape in next_tokens) == SMALL_BATCH - 1  # eight generating: two batches a step
    finally:
        backend.close()


def test_a_prompt_is_never_cut_into_a_piece_larger_than_the_batch(batched):
    """Whatever mix of steps with and without others generating reads a prompt, every piece fits in the batch
    (llama_batch_init's n_batch rows: one more is written past its arrays) and only the serial path's own short
    last chunk is under SMALL_BATCH. Found by review: a 577-token prompt read 64 tokens while another visitor was
    generating, then alone, was given one piece of 513 tokens."""
    scheduler = batched.scheduler
    n_batch = scheduler.n_batch
    for length in range(1, 2 * n_batch + 80):
        for generating_steps in (0, 1, 2, 9):  # steps read while someone else generates, then alone
            slot = Slot(0)
            slot.pending = list(range(length))
            short = length % n_batch
            slot.tail = short if short < SMALL_BATCH else 0
            pieces, step = [], 0
            while slot.pending:
                take = scheduler.piece(slot, PREFILL_CHUNK if step < generating_steps else n_batch)
                pieces.append(take)
                slot.pending = slot.pending[take:]
                step += 1
            assert sum(pieces) == length and max(pieces) <= n_batch, (length, generating_steps, pieces)
            assert all(n >= SMALL_BATCH for n in pieces[:-1]), (length, generating_steps, pieces)
            assert pieces[-1] >= SMALL_BATCH or pieces[-1] == slot.tail or length < SMALL_BATCH


def test_prompts_of_one_length_arriving_together_share_a_batch_and_stay_exact(batched, serial):
    """Visitors who send at the same moment: prompts whose pieces are equally long are read in one batch."""
    topics = ["the history of computers", "how bridges are built", "the water cycle", "the Roman Empire"]
    prompts = [prompt_tokens(batched, SYSTEM + [{"role": "user", "content": f"Write a detailed essay about {t}, with "
                                                 "an introduction and three sections."}]) for t in topics]
    assert len({len(p) for p in prompts}) == 2  # two lengths, two prompts each
    references = [alone(serial, p, GREEDY, 6) for p in prompts]
    recorders = [Recorder(batched, forced=tokens) for tokens, _ in references]
    batches = record_batches(batched)
    try:
        with batched.scheduler.wake:  # all four arrive between two steps
            jobs = [batched.scheduler.submit(Job(p, 6, r)) for p, r in zip(prompts, recorders)]
        for job in jobs:
            while not drain_one(job).finish_reason:
                pass
    finally:
        del batched.scheduler.fill_batch
    short, long = sorted({len(p) for p in prompts})
    assert sorted(sorted(n for n, _ in shape.values()) for shape in batches[:2]) == [[short] * 2, [long] * 2]
    for recorder, (tokens, rows) in zip(recorders, references):
        assert recorder.tokens == tokens
        for got, ref in zip(recorder.rows, rows):
            assert float(np.abs(got - ref).max()) <= LOGIT_TOLERANCE * float(np.abs(ref).max())


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def test_greedy_replies_are_identical_except_counted_near_ties(batched, serial):
    prompts = [prompt_tokens(batched, SYSTEM + m[-1:]) for m in CONVERSATIONS]
    recorders = [Recorder(batched) for _ in prompts]  # the real sampler chain, greedy with the repetition penalty
    run_staggered(batched, prompts, recorders, 40, join_after={1: 2, 2: 5, 3: 9})
    near_ties = 0
    for prompt, recorder in zip(prompts, recorders):
        tokens, rows = alone(serial, prompt, GREEDY, 40)
        i = first_difference(recorder.tokens, tokens)
        if i is not None:
            top = np.sort(rows[i])[-2:]
            assert top[1] - top[0] < NEAR_TIE, f"reply differs at token {i} without a near-tie"
            near_ties += 1
    print(f"greedy replies that differ from the request alone at a near-tie: {near_ties} of {len(prompts)}")


def collect(stream) -> tuple[str, str | None, int]:
    text, finish, tokens = "", None, 0
    for chunk in stream:
        text, finish, tokens = text + chunk.text, chunk.finish_reason or finish, tokens + chunk.tokens
    return text, finish, tokens


def ask_together(backend, requests: list[tuple[list[dict], GenerationParams]]) -> list[tuple[str, str | None, int]]:
    got: dict[int, tuple] = {}

    def ask(i: int) -> None:
        got[i] = collect(backend.stream(*requests[i]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return [got[i] for i in range(len(requests))]


def test_parallel_callers_get_the_serial_backends_replies(batched, serial):
    requests = [(SYSTEM + m[-1:], GREEDY) for m in CONVERSATIONS]
    together = ask_together(batched, requests)
    for (messages, params), (text, finish, tokens) in zip(requests, together):
        assert (text, finish) == collect(serial.stream(messages, params))[:2]
        assert text.strip() and 0 < tokens <= params.max_new_tokens
    assert not batched.scheduler.active() and not batched.scheduler.waiting


def test_count_tokens_and_the_too_long_prompt_are_the_serial_backends(batched, serial):
    for messages in CONVERSATIONS:
        assert batched.count_tokens(messages) == serial.count_tokens(messages)
    with pytest.raises(ValueError, match="exceed context window of 1024"):
        next(batched.stream([{"role": "user", "content": "word " * 1200}], GREEDY))


def wait_until(condition, seconds: float = 60) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def sequence_is_empty(backend, seq: int) -> bool:
    return llama_cpp.llama_memory_seq_pos_max(backend.scheduler.memory, seq) == -1


def test_stop_ends_only_that_visitors_sequence(batched, serial):
    long = GenerationParams(max_new_tokens=60, temperature=0, repeat_penalty=1.2)
    requests = [(SYSTEM + [{"role": "user", "content": f"Write a long story about a {animal}."}], long)
                for animal in ("dragon", "whale", "fox")]
    cancel = threading.Event()
    results: dict[int, tuple] = {}
    freed: dict[str, object] = {}

    def ask(i: int) -> None:
        text, finish, tokens = "", None, 0
        for chunk in batched.stream(*requests[i], cancel if i == 1 else None):
            text, finish, tokens = text + chunk.text, chunk.finish_reason or finish, tokens + chunk.tokens
            if i == 1 and tokens >= 3:
                cancel.set()  # the stop button, pressed by visitor 1 after three tokens
        if i == 1:  # its sequence is freed at once, while the other two are still being answered
            freed["at once"] = wait_until(lambda: len(batched.scheduler.active()) == 2, seconds=10)
            freed["others running"] = [j for j in (0, 2) if j not in results]
        results[i] = (text, finish, tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results[1][1] == "cancelled" and results[1][2] == 3
    assert freed == {"at once": True, "others running": [0, 2]}
    for i in (0, 2):  # the others went on to the end, with exactly the replies they get alone
        assert results[i][1] in ("stop", "length") and results[i][2] > 3
        assert results[i][:2] == collect(serial.stream(*requests[i]))[:2]
    assert not batched.scheduler.active() and all(sequence_is_empty(batched, s) for s in range(4))


def test_closing_a_stream_frees_its_sequence_while_the_others_go_on(batched):
    long = GenerationParams(max_new_tokens=80, temperature=0, repeat_penalty=1.2)
    poem = SYSTEM + [{"role": "user", "content": "Write a poem about autumn."}]
    others = [batched.stream(SYSTEM + [{"role": "user", "content": f"Tell me about {x}."}], long)
              for x in ("volcanoes", "the Moon")]
    closed = batched.stream(poem, long)
    for stream in others + [closed]:
        next(stream)  # all three are generating
    tokens = prompt_tokens(batched, poem)
    slot = next(s for s in batched.scheduler.slots if s.job is not None and s.job.prompt == tokens)
    closed.close()  # the visitor went away (Gradio closes the generator on stop)
    deadline = time.time() + 60
    while slot.job is not None and time.time() < deadline:
        time.sleep(0.01)
    assert slot.job is None and sequence_is_empty(batched, slot.seq)
    assert len(batched.scheduler.active()) == 2  # the other two visitors are still being answered
    for stream in others:
        assert collect(stream)[1] in ("stop", "length")


def test_a_request_beyond_the_slots_waits_and_can_be_cancelled_while_waiting(batched):
    long = GenerationParams(max_new_tokens=300, temperature=0)
    busy = [batched.stream(SYSTEM + [{"role": "user", "content": f"Count to {n}."}], long) for n in (10, 20, 30, 40)]
    for stream in busy:
        next(stream)
    cancel = threading.Event()
    result = {}
    waiting = threading.Thread(target=lambda: result.update(r=collect(batched.stream(
        SYSTEM + [{"role": "user", "content": "Hello?"}], long, cancel))))
    waiting.start()
    assert wait_until(lambda: len(batched.scheduler.waiting) == 1)  # no free sequence: it waits its turn
    cancel.set()
    waiting.join(30)
    assert result["r"] == ("", "cancelled", 0)
    assert wait_until(lambda: not batched.scheduler.waiting)  # and leaves the queue without taking a sequence
    assert len(batched.scheduler.active()) == 4
    for stream in busy:
        stream.close()
    assert wait_until(lambda: not batched.scheduler.active())


# --- repetition penalty, min-p and seeds, per sequence -----------------------------------------------------------

def test_repetition_penalty_min_p_and_seed_are_per_sequence(batched, serial):
    messages = SYSTEM + [{"role": "user", "content": "List as many fruits as you can."}]
    variants = [
        GenerationParams(max_new_tokens=40, temperature=0, repeat_penalty=1.0),
        GenerationParams(max_new_tokens=40, temperature=0, repeat_penalty=1.8),
        GenerationParams(max_new_tokens=40, temperature=1.5, top_p=1.0, min_p=0.0, seed=7),
        GenerationParams(max_new_tokens=40, temperature=1.5, top_p=1.0, min_p=0.5, seed=7),
    ]
    together = [text for text, _, _ in ask_together(batched, [(messages, p) for p in variants])]
    assert together == [collect(serial.stream(messages, p))[0] for p in variants]
    assert len(set(together)) == 4  # each sequence's own settings made a difference
    # A fixed seed gives the same sample again (alone too); another seed gives another.
    assert collect(batched.stream(messages, variants[2]))[0] == together[2]
    reseeded = GenerationParams(max_new_tokens=40, temperature=1.5, top_p=1.0, min_p=0.0, seed=8)
    assert collect(batched.stream(messages, reseeded))[0] != together[2]


# --- the per-conversation prompt cache and trimming ----------------------------------------------------------

TURNS = {
    "rain": ["Alpha here. What is rain?", "Tell me more about clouds, please.", "And why do clouds float?"],
    "bread": ["Bravo asking: how is bread made?", "Which flour is best?", "How long should dough rise?"],
    "gravity": ["Charlie: explain gravity simply.", "Who discovered it?", "Does the Moon pull on us too?"],
}


def started_jobs(backend) -> list[Job]:
    jobs, scheduler = [], backend.scheduler
    original = scheduler.begin

    def begin(slot, job):
        original(slot, job)
        jobs.append(job)

    scheduler.begin = begin
    return jobs


def converse(backend, key_of, params: GenerationParams, n_ctx: int | None = None,
             conversations: dict[str, list[str]] = TURNS) -> tuple[dict, list[int]]:
    """The conversations interleaved turn by turn (trimmed to n_ctx when given); replies per conversation and
    (prompt tokens, messages left out) per request."""
    histories = {name: list(SYSTEM) for name in conversations}
    replies = {name: [] for name in conversations}
    sizes = []
    for turn in range(len(next(iter(conversations.values())))):
        for name, turns in conversations.items():
            histories[name].append({"role": "user", "content": turns[turn]})
            fitted = histories[name]
            if n_ctx is not None:
                fitted, _ = trim(fitted, backend.count_tokens, n_ctx, params.max_new_tokens)
            sizes.append((backend.count_tokens(fitted), len(histories[name]) - len(fitted)))
            replies[name].append(collect(backend.stream(fitted, replace(params, conversation=key_of(name))))[0])
            histories[name].append({"role": "assistant", "content": replies[name][-1]})
    return replies, sizes


def test_each_conversation_reuses_only_its_own_saved_state():
    """Interleaved conversations get what the serial backend gives them with its cache (the same reuse: a reply's
    KV cells computed one token at a time are kept, which is not bitwise what evaluating them in the next prompt's
    batch gives, on either path)."""
    params = GenerationParams(max_new_tokens=20, temperature=0, repeat_penalty=1.1)
    cached = load_backend(settings(2, CHATBOT_CACHE_MB="64"))
    try:
        jobs = started_jobs(cached)
        replies, sizes = converse(cached, lambda name: f"session-{name}", params)
        assert (replies, sizes) == converse(load_backend(settings(1, CHATBOT_CACHE_MB="64")),
                                            lambda name: f"session-{name}", params)
        # From turn 2 on only the new message (and the template's few tokens around it) was evaluated.
        later = [(len(j.prompt) - j.reused, size) for j, (size, _) in zip(jobs[3:], sizes[3:])]
        assert all(n <= 25 and size - n >= 40 for n, size in later), later
        assert len(cached.cache.entries) == 3
        # Another conversation opening with the same words gets nothing from it (no timing side channel), ...
        first = SYSTEM + [{"role": "user", "content": TURNS["rain"][0]}]
        collect(cached.stream(first, replace(params, conversation="someone-else")))
        assert jobs[-1].reused == 0
        # ... while the same conversation asking again gets everything but the last prompt token.
        collect(cached.stream(first, replace(params, conversation="someone-else")))
        assert jobs[-1].reused == len(jobs[-1].prompt) - 1
        # A request that keeps no state (an Arena battle) neither reuses that state nor leaves one of its own.
        saved = {key: id(state) for key, state in cached.cache.entries.items()}
        collect(cached.stream(first, replace(params, conversation="someone-else", keep_state=False)))
        assert jobs[-1].reused == 0 and {key: id(s) for key, s in cached.cache.entries.items()} == saved
    finally:
        cached.close()


LONG = {"rain": TURNS["rain"] + ["Thanks! What is snow?", "And hail?", "Is sleet like hail?"],
        "bread": TURNS["bread"] + ["Can I use honey?", "What about salt?", "Why does bread go stale?"]}


def test_trimmed_history_is_a_new_prefix_and_still_exact():
    """A small context drops the oldest turns; the saved state of the untrimmed history must not leak in."""
    params = GenerationParams(max_new_tokens=40, temperature=0, repeat_penalty=1.1)
    for cache_mb in ("0", "64"):
        runs = []
        for parallel in (2, 1):
            backend = load_backend(settings(parallel, CHATBOT_CACHE_MB=cache_mb, CHATBOT_N_CTX="256",
                                            CHATBOT_MAX_NEW_TOKENS="64"))
            runs.append(converse(backend, lambda name: name, params, n_ctx=backend.n_ctx, conversations=LONG))
            if parallel > 1:
                backend.close()
        assert runs[0] == runs[1], f"CHATBOT_CACHE_MB={cache_mb}"
        dropped = [n for _, n in runs[0][1]]
        assert dropped[0] == 0 and dropped[-1] > 0  # the last turns really were trimmed


def test_the_cache_stays_within_its_bound_and_evicts_the_least_recently_used():
    backend = load_backend(settings(2, CHATBOT_CACHE_MB="2"))  # ~23 KiB of KV a token: a few short states
    try:
        params = GenerationParams(max_new_tokens=16, temperature=0)
        for i, turns in enumerate(TURNS.values()):
            for message in turns:
                collect(backend.stream(SYSTEM + [{"role": "user", "content": message}],
                                       replace(params, conversation=f"{i}-{message}")))
                assert 0 < backend.cache.nbytes <= 2 * 2**20
        keys = list(backend.cache.entries)
        assert 1 <= len(keys) < 9 and keys[-1] == f"2-{TURNS['gravity'][-1]}"  # the most recent is kept
    finally:
        backend.close()


# --- settings, registry, memory --------------------------------------------------------------------------------

def test_parallel_setting_selects_the_path_and_allocates_kv_for_every_slot(batched, serial):
    assert isinstance(batched, BatchedLlamaCppBackend) and isinstance(serial, LlamaCppBackend)
    assert batched.max_concurrency == 4 and serial.max_concurrency == 1
    assert batched.n_ctx == serial.n_ctx == 1024  # every visitor keeps the whole context
    assert llama_cpp.llama_n_ctx(batched.ctx) == 4 * 1024
    assert load_settings({}).parallel == 4


@pytest.mark.parametrize("env, message", [
    ({"CHATBOT_PARALLEL": "0"}, "CHATBOT_PARALLEL='0' is not valid; accepted: an integer >= 1 and <= 64"),
    ({"CHATBOT_PARALLEL": "four"}, "CHATBOT_PARALLEL='four' is not valid; accepted: an integer >= 1 and <= 64"),
    ({"CHATBOT_PARALLEL": "65"}, "CHATBOT_PARALLEL='65' is not valid; accepted: an integer >= 1 and <= 64"),
    ({"CHATBOT_PARALLEL": "4", "CHATBOT_BACKEND": "transformers"},
     "CHATBOT_PARALLEL='4' is not valid; accepted: 1 (or unset) with CHATBOT_BACKEND=transformers"),
])
def test_bad_parallel_values_are_one_line_errors(env, message):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
