"""The Arena in the browser: with CHATBOT_ARENA_MODEL set the page has a Chat tab and an Arena tab; a prompt there
streams two replies side by side, the vote buttons wake once both are done, a click reveals which model wrote A and
B and writes the vote record training reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_browser import CHAT_INPUT, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_a_battle_and_a_vote_in_the_browser(browser, serve_app, page, artifacts, tmp_path):
    env = {"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0.05", "CHATBOT_MODEL": "alpha",
           "CHATBOT_ARENA_MODEL": "beta", "CHATBOT_FEEDBACK_DIR": str(tmp_path)}
    with serve_app("arena", env, timeout=90) as url:
        page.goto(url)
        page.locator(CHAT_INPUT).wait_for()  # the chat is the first tab, as without the Arena
        page.get_by_role("tab", name="Arena").click()
        page.get_by_text("their names are shown after you vote").wait_for()  # the Arena tab shows (or a timeout)
        vote_a = page.locator("#arena-vote-A")
        assert vote_a.is_disabled()
        page.locator("#arena-message textarea").fill("Which is the best fruit?")
        page.locator("#arena-ask").click()
        reply_a, reply_b = page.locator("#arena-a"), page.locator("#arena-b")
        seen = set()
        wait_until(lambda: seen.add(reply_a.inner_text()) or "Vote below" in page.locator("#arena-status")
                   .inner_text(), 30, "both replies")
        assert len(seen) >= 3  # A grew while it streamed
        wait_until(lambda: vote_a.is_enabled(), 10, "the vote buttons")
        shown_a, shown_b = reply_a.inner_text(), reply_b.inner_text()
        names = [text.split("[", 1)[1].split("]", 1)[0] for text in (shown_a, shown_b)]
        assert sorted(names) == ["alpha", "beta"] and "You said: Which is the best fruit?" in shown_a
        vote_a.click()
        wait_until(lambda: "A was" in page.locator("#arena-status").inner_text(), 10, "the reveal")
        status = page.locator("#arena-status").inner_text()
        assert f"A was {names[0]}, B was {names[1]}." in status and "your vote is saved" in status
        wait_until(lambda: vote_a.is_disabled(), 10, "the buttons to lock after the vote")
        page.screenshot(path=artifacts / "arena.png")

    (record,) = records(tmp_path)
    assert record["type"] == "arena" and record["vote"] == "A"
    assert [r["model"]["name"] for r in record["replies"]] == names
    assert record["replies"][0]["reply"].strip() == shown_a.strip()
    assert record["messages"][-1] == {"role": "user", "content": "Which is the best fruit?"}
