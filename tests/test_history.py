"""History: both Gradio message shapes normalise to plain strings; trimming keeps system + newest."""
from __future__ import annotations

from chatbot.history import NOTICE, build_messages, content_text, normalise, trim


def test_browser_content_blocks_and_api_strings_normalise_the_same():
    browser = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]}]
    api = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert normalise(browser) == normalise(api) == api
    assert all(isinstance(m["content"], str) for m in normalise(browser))


def test_files_thoughts_empty_and_app_notices_are_dropped():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/x.png"}}]},
        {"role": "user", "content": "look at this"},
        {"role": "assistant", "content": "thinking", "metadata": {"title": "🔧 tool"}},
        {"role": "assistant", "content": "Nice picture."},
        {"role": "user", "content": "   "},
        {"role": "assistant", "content": NOTICE + "Please type a message."},
        {"role": "user", "content": "x" * 50},
        {"role": "assistant", "content": NOTICE + "Your message is too long"},
        {"role": "system", "content": "ignored: the system prompt comes from the settings box"},
    ]
    assert normalise(history) == [{"role": "user", "content": "look at this"},
                                  {"role": "assistant", "content": "Nice picture."}]


def test_content_text_shapes():
    assert content_text(None) == ""
    assert content_text({"text": "a", "files": []}) == "a"
    assert content_text(("path.png",)) == ""
    assert content_text([{"type": "text", "text": "a"}, {"type": "image"}, "b"]) == "ab"


def test_build_messages_skips_blank_system_prompt():
    assert build_messages("  ", [], "hi") == [{"role": "user", "content": "hi"}]
    assert build_messages("S", [], "hi")[0] == {"role": "system", "content": "S"}


def _conversation(turns: int) -> list[dict]:
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": f"question {i} " + "w " * 10},
                    {"role": "assistant", "content": f"answer {i} " + "w " * 10}]
    return build_messages("system prompt", history, "newest question")


def words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) + 1 for m in messages)


def test_everything_kept_when_it_fits():
    messages = _conversation(3)
    kept, n = trim(messages, words, n_ctx=1000, max_new_tokens=100)
    assert kept == messages and n == words(messages)


def test_oldest_turns_go_first_keeping_system_and_newest():
    messages = _conversation(10)
    budget_for_two_turns = words(messages[:1] + messages[-5:]) + 50
    kept, n = trim(messages, words, n_ctx=budget_for_two_turns, max_new_tokens=50)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1:] == messages[-5:]  # the two newest turns, whole, plus the newest question
    assert kept[1]["role"] == "user"
    assert n == words(kept) <= budget_for_two_turns - 50


def test_newest_message_alone_too_long_gives_none():
    messages = _conversation(2)
    assert trim(messages, words, n_ctx=words(messages[:1] + messages[-1:]) + 9, max_new_tokens=10) is None
    assert trim(messages, words, n_ctx=words(messages[:1] + messages[-1:]) + 10, max_new_tokens=10) is not None


def test_history_starting_with_assistant_greeting_is_kept_when_it_fits():
    messages = build_messages("s", [{"role": "assistant", "content": "Welcome!"}], "hi")
    assert trim(messages, words, 100, 10)[0] == messages


def test_trimming_tokenises_few_times():
    calls = []

    def counting(msgs):
        calls.append(1)
        return words(msgs)

    trim(_conversation(200), counting, n_ctx=200, max_new_tokens=50)
    assert len(calls) <= 10  # binary search, not one tokenisation per turn
