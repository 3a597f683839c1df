"""Feedback in the browser: with CHATBOT_FEEDBACK_DIR set the page says conversations are saved, and clicking thumbs
up / down and Retry on real replies writes the records training reads, with the right conversation and the system
prompt and settings each reply was generated with (not the page's when the thumb is clicked)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_browser import bot_texts, open_chat, send, set_text, wait_idle, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_thumbs_and_retry_in_the_browser_land_in_the_jsonl(browser, serve_app, page, artifacts, tmp_path):
    env = {"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0.01", "CHATBOT_FEEDBACK_DIR": str(tmp_path)}
    with serve_app("feedback", env, timeout=90) as url:
        open_chat(page, url)
        assert page.get_by_text("Conversations and ratings on this page are").is_visible()
        send(page, "First question")
        wait_idle(page)
        first = bot_texts(page)[-1].strip()
        page.locator("button.label-wrap", has_text="Settings").click()
        # the next replies' prompt, not the first's
        set_text(page, page.get_by_label("System prompt", exact=True), "Answer like a pirate.")
        send(page, "Second question")
        wait_idle(page)
        second = bot_texts(page)[-1].strip()

        page.get_by_role("button", name="Like", exact=True).first.click()    # thumbs up on the first reply
        page.get_by_role("button", name="Dislike", exact=True).last.click()  # thumbs down on the second
        wait_until(lambda: len(records(tmp_path)) >= 2, 30, "two thumbs records")
        page.get_by_role("button", name="Retry").last.click()      # regenerate the second reply...
        wait_idle(page)
        send(page, "Third question")                               # ...and go on with the new one
        wait_idle(page)
        wait_until(lambda: len(records(tmp_path)) >= 4, 30, "the retried and kept records")
        page.screenshot(path=artifacts / "feedback.png")

    up, down, retried, kept = records(tmp_path)
    system = {"role": "system", "content": "You are a helpful assistant."}
    pirate = {"role": "system", "content": "Answer like a pirate."}
    assert (up["rating"], up["reply"]) == ("up", first)
    assert up["messages"] == [system, {"role": "user", "content": "First question"}]
    assert (down["rating"], down["reply"]) == ("down", second)
    assert down["messages"] == [pirate, {"role": "user", "content": "First question"},
                                {"role": "assistant", "content": first}, {"role": "user", "content": "Second question"}]
    seeds = [r["sampling"]["seed"] for r in (up, down, retried, kept)]
    assert all(isinstance(s, int) for s in seeds) and seeds[2] != seeds[3]  # the retry sampled afresh
    assert page.locator("#feedback-status").inner_text().strip() == ""  # nothing refused
    assert (retried["rating"], retried["reply"]) == ("retried", second)
    assert kept["rating"] == "kept" and kept["messages"] == down["messages"]
    assert len({r["conversation_id"] for r in (up, down, retried, kept)}) == 1
    assert up["sampling"]["temperature"] == 0.2 and up["model"]["backend"] == "mock"
