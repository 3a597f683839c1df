"""What a person does in the browser: send, watch the reply stream in, stop it, retry, change the system prompt,
and ask the embedded SmolLM2 a real question. Each test saves a screenshot to test-artifacts/.

Selectors are Gradio 6.31's own test ids and aria labels (data-testid="bot", aria-label="Retry", ...).
"""
from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

MOCK_DELAY = 0.2  # seconds per mock token: a ~20-word reply takes ~4 s, time enough to watch and to stop it
POLL = 0.05
# The chat input: the textarea beside the submit/stop button (its placeholder goes once the chat has messages).
CHAT_INPUT = ".input-container:has(> button.submit-button, > button.stop-button) textarea"


@pytest.fixture(scope="module")
def mock_app(browser, serve_app):
    with serve_app("mock", {"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": str(MOCK_DELAY)},
                     timeout=90) as url:
        yield url


@pytest.fixture(scope="module")
def smollm2_app(browser, serve_app):
    # Nothing set but greedy decoding: the default backend and the embedded model, reproducibly.
    with serve_app("smollm2", {"CHATBOT_TEMPERATURE": "0"}, timeout=120) as url:
        yield url


def open_chat(page, url):
    page.goto(url)
    page.locator(CHAT_INPUT).wait_for()


_BEFORE: dict[int, tuple[int, str]] = {}  # per page: (bot messages, last bot text) when the last message was sent


def send(page, text):
    _BEFORE[id(page)] = (len(bot_texts(page)), last_bot(page))
    box = page.locator(CHAT_INPUT)
    box.fill(text)  # waits until the box is enabled again after the previous reply
    box.press("Enter")


def set_text(page, box, text: str) -> None:
    """Type `text` into `box` and leave it, as a visitor does; again until the box still holds it a moment later.
    A settings box mounts when its accordion opens and takes its initial value a moment later: a fill in the first
    few hundred ms was reset in 4 of 8 runs (none after waiting 1.5 s), and CI once sent the old system prompt."""
    for _ in range(5):
        box.fill(text)
        box.press("Tab")
        page.wait_for_timeout(300)
        if box.input_value() == text:
            return
    pytest.fail(f"the box would not keep {text!r}; it holds {box.input_value()!r}")


def bot_texts(page) -> list[str]:
    return page.locator('[data-testid="bot"]').all_inner_texts()


def last_bot(page) -> str:
    texts = bot_texts(page)
    return texts[-1].strip() if texts else ""


def busy(page) -> bool:
    """The stop button replaces the submit button while a reply is being generated."""
    return page.locator('button.stop-button').is_visible()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL)


def wait_idle(page, timeout: float = 30):
    """Wait for the reply to start (the stop button shows, or the chat changed since the last send: a reply can be
    over between two looks), then for the submit button to come back. An earlier reply on the page does not count:
    on a loaded machine the request can take a moment to start."""
    before = _BEFORE.get(id(page), (0, ""))
    wait_until(lambda: busy(page) or (len(bot_texts(page)), last_bot(page)) != before, 10, "the reply to start")
    wait_until(lambda: not busy(page) and page.locator("button.submit-button").is_visible(), timeout,
               "the reply to finish")


def watch_reply(page, timeout: float = 30) -> list[str]:
    """Every distinct text of the newest bot message until generation ends."""
    seen: list[str] = []
    wait_until(lambda: busy(page), 10, "generation to start")
    deadline = time.monotonic() + timeout
    while busy(page) and time.monotonic() < deadline:
        text = last_bot(page)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(POLL)
    wait_idle(page, timeout)
    final = last_bot(page)
    if not seen or seen[-1] != final:
        seen.append(final)
    return seen


def assert_ended_by_itself(page):
    """The stats line names how a reply ended unless the model ended it itself (finish reason "stop")."""
    stats = page.locator("#reply-stats").inner_text()
    assert "tokens/s" in stats and "stopped" not in stats, stats


def test_reply_streams_in(mock_app, page, artifacts):
    open_chat(page, mock_app)
    send(page, "Hello there")
    wait_until(lambda: len(last_bot(page).split()) >= 4, 15, "the first words of the reply")
    assert busy(page), "the reply was already complete at 4 words: it did not stream"
    page.screenshot(path=artifacts / "mock-streaming.png")
    seen = watch_reply(page)

    final = seen[-1]
    assert final.startswith("You said: Hello there") and final.endswith("messages: 2"), final
    growing = [t for t in seen if t]
    assert len(growing) >= 3, f"the reply arrived in {len(growing)} piece(s), not streamed: {growing}"
    for shorter, longer in zip(growing, growing[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter), (shorter, longer)
    assert_ended_by_itself(page)
    page.screenshot(path=artifacts / "mock-streamed.png")


def test_stop_ends_the_reply_and_the_next_one_runs(mock_app, page, artifacts):
    open_chat(page, mock_app)
    send(page, "Tell me a long story")
    wait_until(lambda: len(last_bot(page).split()) >= 3, 15, "the reply to start streaming")
    page.locator("button.stop-button").click()
    wait_until(lambda: not busy(page), 5, "the stop button to end generation")
    time.sleep(0.3)  # an update already on the wire may still land
    stopped = last_bot(page)
    time.sleep(8 * MOCK_DELAY)  # long enough for several more tokens, had decoding gone on
    assert last_bot(page) == stopped, "text kept arriving after stop"
    assert stopped.startswith("You said:") and "messages:" not in stopped, f"the reply ran to the end: {stopped!r}"
    page.screenshot(path=artifacts / "mock-stopped.png")

    # The stopped request left nothing behind: the next message gets a whole reply.
    send(page, "Shorter then")
    final = watch_reply(page)[-1]
    assert final.startswith("You said: Shorter then") and final.endswith("messages: 4"), final


def test_retry_regenerates_the_last_reply(mock_app, page, artifacts):
    open_chat(page, mock_app)
    send(page, "first question")
    watch_reply(page)
    send(page, "second question")
    before = watch_reply(page)[-1]
    assert before.endswith("messages: 4"), before

    page.get_by_role("button", name="Retry").last.click()
    again = watch_reply(page)
    # Regenerated from scratch (it streamed again from a short prefix), in place of the old reply:
    # the same history went to the backend and no extra turn was appended.
    assert any(len(t) < len(before) for t in again), f"retry did not regenerate, it showed {again} only"
    assert again[-1] == before
    assert len(bot_texts(page)) == 2
    assert page.locator('[data-testid="user"]').all_inner_texts()[-1].strip() == "second question"
    page.screenshot(path=artifacts / "mock-retried.png")


def test_system_prompt_in_settings_takes_effect(mock_app, page, artifacts):
    open_chat(page, mock_app)
    system_box = page.get_by_label("System prompt")
    assert not system_box.is_visible(), "the settings should start folded away in their accordion"
    page.locator("button.label-wrap", has_text="Settings").click()
    # Gradio renders an accordion's content after the click: wait for it before asking where the box sits.
    system_box.wait_for(state="visible")
    accordion = page.locator('[data-testid="accordion-content"]', has=page.get_by_label("System prompt"))
    assert accordion.count() == 1, "the System prompt box is not inside the Settings accordion"
    set_text(page, system_box, "You are a pirate. Answer in rhymes.")
    send(page, "Who are you?")
    final = watch_reply(page)[-1]
    assert "system prompt: You are a pirate. Answer in rhymes." in final, final
    page.screenshot(path=artifacts / "mock-system-prompt.png", full_page=True)


def test_embedded_smollm2_answers_and_stops_by_itself(smollm2_app, page, artifacts):
    open_chat(page, smollm2_app)
    send(page, "What is the capital of France?")
    answer = watch_reply(page, timeout=90)[-1]
    assert answer, "empty answer"
    assert_ended_by_itself(page)
    page.screenshot(path=artifacts / "smollm2-answer.png")


def test_conversation_survives_a_reload_in_the_history_panel(mock_app, page, artifacts):
    open_chat(page, mock_app)
    send(page, "Remember the lighthouse")
    first = watch_reply(page)[-1]
    assert first.startswith("You said: Remember the lighthouse"), first
    page.reload()
    page.locator(CHAT_INPUT).wait_for()
    assert not bot_texts(page), "a reload starts a new chat"
    # The browser kept the conversation (localStorage): it is listed and opens again, with its reply.
    saved = page.get_by_text("Remember the lighthouse").first
    saved.wait_for()
    saved.click()
    wait_until(lambda: last_bot(page) == first, 10, "the saved conversation to open")
    page.screenshot(path=artifacts / "mock-history-after-reload.png")
    send(page, "And now?")
    assert watch_reply(page)[-1].endswith("messages: 4")  # the history of the reopened chat reaches the backend
