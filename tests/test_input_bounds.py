"""The chat function (chatbot/ui.py make_respond) with a backend that records every call: each visitor input is
bounded before it costs anything - no tokenising, no model - and each request gets a fresh seed and the cache key of
its own conversation of its own browser session."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from chatbot.backends.mock import MockBackend
from chatbot.history import keep_recent
from chatbot.settings import load_settings
from chatbot.ui import make_respond


class CountingBackend(MockBackend):
    """The mock backend, counting tokenisations and keeping every request's parameters."""

    def __init__(self, settings):
        super().__init__(settings)
        self.counted, self.params = [], []

    def count_tokens(self, messages):
        self.counted.append(sum(len(m["content"]) for m in messages))
        return super().count_tokens(messages)

    def stream(self, messages, params, cancel=None):
        self.params.append(params)
        yield from super().stream(messages, params, cancel)


def chat(env: dict | None = None):
    settings = load_settings({"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0", **(env or {})})
    backend = CountingBackend(settings)
    return make_respond(settings, backend), backend


def final(respond, message, history=(), *settings, session="tab") -> tuple[str, str]:
    *_, last = respond(message, list(history), *settings, request=SimpleNamespace(session_hash=session))
    return last


def test_an_oversized_system_prompt_is_refused_before_anything_is_tokenised():
    respond, backend = chat({"CHATBOT_MAX_SYSTEM_CHARS": "100"})
    reply, _ = final(respond, "hi", [], "x" * 101)
    assert reply == ("⚠️ The system prompt is 101 characters long; the limit is 100 (CHATBOT_MAX_SYSTEM_CHARS). "
                     "Please shorten it.")
    assert backend.counted == [] and backend.params == []
    assert not final(respond, "hi", [], "x" * 100)[0].startswith("⚠️")


@pytest.mark.parametrize("position, label", [(0, "Temperature"), (1, "Top-p"), (2, "Max new tokens"),
                                             (3, "Repetition penalty"), (4, "Min-p")])
@pytest.mark.parametrize("value", [float("nan"), float("-inf"), "lots"])
def test_a_setting_that_is_not_a_number_gets_a_notice_naming_it(position, label, value):
    respond, backend = chat()
    settings = [0.2, 0.9, 32, 1.2, 0.05]
    settings[position] = value
    reply, _ = final(respond, "hi", [], "Sys", *settings)
    assert reply == f"⚠️ {label}={value!r} is not valid; accepted: " + reply.split("accepted: ")[1]
    assert backend.counted == [] and backend.params == []


def test_numbers_out_of_range_are_clamped_to_the_sliders():
    respond, backend = chat()
    final(respond, "hi", [], "Sys", 9.0, -1, 32, 0.5, 3)
    p = backend.params[-1]
    assert (p.temperature, p.top_p, p.max_new_tokens, p.repeat_penalty, p.min_p) == (2.0, 0.01, 32, 1.0, 1.0)
    reply, _ = final(respond, "hi", [], "Sys", 0.2, 0.9, 10**9)
    assert "plus 4095 new tokens, and the context holds 4096" in reply  # max new tokens: at most the context - 1


def test_the_oldest_turns_beyond_the_history_limit_are_left_out_before_tokenising():
    respond, backend = chat({"CHATBOT_MAX_HISTORY_CHARS": "1000"})
    history = [{"role": "user", "content": "a" * 3_000_000}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "b" * 400}, {"role": "assistant", "content": "c" * 400}]
    reply, stats = final(respond, "Newest?", history, "Sys")
    assert "messages: 4" in reply  # system, the last whole turn, the newest message
    assert "2 oldest messages over CHATBOT_MAX_HISTORY_CHARS left out" in stats
    assert max(backend.counted) < 1000 + 100  # the 3 MB turn was never tokenised


def test_keep_recent_keeps_whole_turns_within_the_limit():
    turn = [{"role": "user", "content": "q" * 10}, {"role": "assistant", "content": "a" * 10}]
    assert keep_recent(turn * 3, 45) == turn * 2
    assert keep_recent(turn * 3, 15) == []  # half a turn is no turn
    assert keep_recent(turn * 3, 60) == turn * 3


def test_each_request_samples_with_a_fresh_seed_unless_chatbot_seed_is_set():
    respond, backend = chat()
    for _ in range(3):
        final(respond, "hi", [], "Sys", 1.0)
    assert len({p.seed for p in backend.params}) == 3 and all(isinstance(p.seed, int) for p in backend.params)
    respond, backend = chat({"CHATBOT_SEED": "42"})
    for _ in range(2):
        final(respond, "hi", [], "Sys", 1.0)
    assert [p.seed for p in backend.params] == [42, 42]


def test_the_cache_key_belongs_to_one_conversation_of_one_session():
    respond, backend = chat()
    final(respond, "First", [], session="alice")
    final(respond, "Next", [{"role": "user", "content": "First"}, {"role": "assistant", "content": "ok"}],
          session="alice")
    final(respond, "First", [], session="mallory")  # the same first message in another session
    final(respond, "Another chat", [], session="alice")
    for _ in range(2):  # a caller without a session: a key of its own each time, never reused
        list(respond("First", [], request=None))
    alice, alice_next, mallory, alice_other, lone, lone_again = [p.conversation for p in backend.params]
    assert alice == alice_next
    assert len({alice, mallory, alice_other, lone, lone_again}) == 5
    assert "alice" not in alice and "First" not in alice  # opaque
