"""The llama_cpp backend's per-conversation prompt cache on the real embedded SmolLM2: interleaved conversations get
exactly the replies they get uninterrupted, only new tokens are evaluated, trimmed histories work, memory is bounded."""
from __future__ import annotations

import pytest

from chatbot.backends import GenerationParams, load_backend
from chatbot.history import trim
from chatbot.settings import load_settings

GREEDY = GenerationParams(max_new_tokens=20, temperature=0, repeat_penalty=1.1)
SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}]
CONVERSATIONS = {
    "rain": ["Alpha here. What is rain?", "Tell me more about clouds, please.", "And why do clouds float?"],
    "bread": ["Bravo asking: how is bread made?", "Which flour is best?", "How long should dough rise?"],
    "gravity": ["Charlie: explain gravity simply.", "Who discovered it?", "Does the Moon pull on us too?"],
}


def backend(cache_mb: int, n_ctx: int = 2048):
    return load_backend(load_settings({"CHATBOT_THREADS": "1", "CHATBOT_N_CTX": str(n_ctx),
                                       "CHATBOT_MAX_NEW_TOKENS": "64", "CHATBOT_CACHE_MB": str(cache_mb),
                                       "CHATBOT_PARALLEL": "1"}))  # the serial backend's cache


def reply(b, messages: list[dict], params: GenerationParams = GREEDY) -> str:
    return "".join(c.text for c in b.stream(messages, params))


def count_evaluated(b) -> list[int]:
    """Record how many tokens each generation's first llama.cpp eval call processes (the prompt's uncached part)."""
    seen: list[int] = []
    original_generate, original_eval = b.llm.generate, b.llm.eval
    first = {"pending": False}

    def generate(*args, **kwargs):
        first["pending"] = True
        return original_generate(*args, **kwargs)

    def eval_(tokens):
        if first["pending"]:
            seen.append(len(tokens))
            first["pending"] = False
        return original_eval(tokens)

    b.llm.generate, b.llm.eval = generate, eval_
    return seen


@pytest.fixture(scope="module")
def uninterrupted():
    """Each conversation's greedy replies, turn after turn with nobody in between, prompt cache off."""
    b = backend(0)
    replies = {}
    for name, turns in CONVERSATIONS.items():
        history = list(SYSTEM)
        replies[name] = []
        for message in turns:
            history.append({"role": "user", "content": message})
            replies[name].append(reply(b, history))
            history.append({"role": "assistant", "content": replies[name][-1]})
    return replies


def test_interleaved_conversations_get_exactly_their_uninterrupted_replies(uninterrupted):
    cached = backend(256)
    evaluated = count_evaluated(cached)
    histories = {name: list(SYSTEM) for name in CONVERSATIONS}
    got = {name: [] for name in CONVERSATIONS}
    prompt_sizes = []
    for turn in range(3):
        for name, turns in CONVERSATIONS.items():  # rain, bread, gravity, rain, ...: someone always came between
            histories[name].append({"role": "user", "content": turns[turn]})
            prompt_sizes.append(cached.count_tokens(histories[name]))
            got[name].append(reply(cached, histories[name]))
            histories[name].append({"role": "assistant", "content": got[name][-1]})
    assert got == uninterrupted
    assert all(text.strip() for texts in got.values() for text in texts)
    # From turn 2 on, each returning conversation's state came back from the cache: only its new message (plus the
    # template's few tokens around it) was evaluated, not the whole history.
    later = list(zip(evaluated[3:], prompt_sizes[3:]))
    assert all(n <= 25 and size - n >= 40 for n, size in later), later
    assert len(cached.cache.cache_state) == 3  # one state per conversation: earlier turns were replaced


def test_without_the_cache_a_returning_conversation_is_evaluated_again():
    plain = backend(0)
    evaluated = count_evaluated(plain)
    a, b = list(SYSTEM), list(SYSTEM)
    for history, message in ((a, "Alpha here. What is rain?"), (b, "Bravo asking: how is bread made?")):
        history += [{"role": "user", "content": message}]
        history += [{"role": "assistant", "content": reply(plain, history)}]
    a.append({"role": "user", "content": "Tell me more about clouds, please."})
    reply(plain, a)
    assert evaluated[-1] > 40  # everything after the shared system prompt, again


def test_trimmed_history_is_a_new_prefix_and_still_exact():
    """A small context drops the oldest turns; the cached state of the untrimmed history must not leak in."""
    params = GenerationParams(max_new_tokens=40, temperature=0, repeat_penalty=1.1)
    runs = {}
    for cache_mb in (0, 256):  # uninterrupted without the cache, another visitor in between with it
        b = backend(cache_mb, n_ctx=256)
        other = SYSTEM + [{"role": "user", "content": "Bravo asking: how is bread made?"}]
        history, dropped, replies = list(SYSTEM), [], []
        for message in CONVERSATIONS["rain"] + ["Thanks! What is snow?", "And hail?", "Is sleet like hail?"]:
            history.append({"role": "user", "content": message})
            fitted, _ = trim(history, b.count_tokens, b.n_ctx, params.max_new_tokens)
            dropped.append(len(history) - len(fitted))
            replies.append(reply(b, fitted, params))
            history.append({"role": "assistant", "content": replies[-1]})
            if cache_mb:
                reply(b, other, params)  # another visitor in between
        runs[cache_mb] = (replies, dropped)
    assert runs[256] == runs[0]
    assert runs[0][1][0] == 0 and runs[0][1][-1] > 0  # the last turns really were trimmed


def test_cache_stays_within_its_bound_and_evicts_the_least_recently_used():
    from chatbot.backends.llama_cpp_cache import state_bytes

    b = backend(4)  # 4 MiB: a 40-token state is about 1.2 MiB (23 KiB of KV a token + 0.2 MiB logits row)
    bound = 4 * 2**20
    for turns in CONVERSATIONS.values():
        for message in turns[:2]:
            reply(b, SYSTEM + [{"role": "user", "content": message}])
            assert 0 < b.cache.cache_size <= bound
    states = list(b.cache.cache_state.values())
    assert b.cache.cache_size == sum(state_bytes(s) for s in states)  # the real bytes, logits included
    assert all(s.scores.shape[0] == 1 for s in states)  # not the n_batch × vocabulary logits llama.cpp copies
    assert 1 <= len(states) < 6  # six replies, some evicted
    newest, n = next(reversed(b.cache.cache_state)), b.llm.n_tokens
    assert list(newest[:n]) == b.llm.input_ids[:n].tolist()  # the most recent conversation is kept
    evaluated = count_evaluated(b)
    reply(b, SYSTEM + [{"role": "user", "content": CONVERSATIONS["rain"][0]}])  # evicted long ago: evaluated again
    assert evaluated[-1] > 10


def test_cache_off_keeps_no_state():
    b = backend(0)
    reply(b, SYSTEM + [{"role": "user", "content": "Hi!"}])
    assert b.cache is None and b.llm.cache is None
