"""The Arena tab (chatbot/arena.py's battles and votes on the page), and its two API endpoints:

    /arena  (message)            -> battle id, reply A, reply B, status line   (streams while both models answer)
    /vote   (battle_id, choice)  -> the models' names and whether the vote was saved; choice: A, B, tie, both_bad

Both go through the app's queue like /chat; a vote counts only from the session that ran the battle (gradio_client
keeps one session per Client; over plain HTTP send the same "session_hash" with both calls).
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from chatbot import feedback
from chatbot.arena import Arena
from chatbot.settings import Settings

BUTTONS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


def intro(settings: Settings) -> str:
    saved = feedback.notice(settings, "Prompts, replies and votes") or " Votes are not saved on this server."
    return ("Two models answer your prompt side by side, as **A** and **B** in random order; their names are shown "
            "after you vote." + saved)


def arena_tab(settings: Settings, arena: Arena) -> None:
    """The tab's components and events, inside the app's gr.Blocks (ui.build_app puts them in a gr.Tab)."""
    gr.Markdown(intro(settings), elem_id="arena-intro")
    replies = []
    with gr.Row(equal_height=True):
        for label in ("A", "B"):
            with gr.Column():
                gr.Markdown(f"### {label}")
                replies.append(gr.Markdown(label=label, container=True, min_height=160,
                                           elem_id=f"arena-{label.lower()}"))
    reply_a, reply_b = replies
    status = gr.Markdown("", label="Status", elem_id="arena-status")
    with gr.Row():
        buttons = {vote: gr.Button(label, interactive=False, elem_id=f"arena-vote-{vote}")
                   for vote, label in BUTTONS.items()}
    with gr.Row(equal_height=True):
        message = gr.Textbox(placeholder="Ask both models…", show_label=False, scale=8, max_lines=8,
                             elem_id="arena-message")
        ask = gr.Button("Ask both", variant="primary", scale=1, elem_id="arena-ask")
    battle = gr.Textbox(label="Battle id", visible="hidden", elem_id="arena-battle")

    def fight(message: Any, request: gr.Request):
        yield from arena.fight(message, getattr(request, "session_hash", None))

    def votable(battle_id: str):
        return [gr.Button(interactive=bool(battle_id))] * len(buttons)

    def locked():
        return [gr.Button(interactive=False)] * len(buttons)

    gr.on([ask.click, message.submit], locked, None, list(buttons.values()), queue=False, api_visibility="private",
          show_progress="hidden")
    gr.on([ask.click, message.submit], fight, [message], [battle, reply_a, reply_b, status], api_name="arena",
          concurrency_limit=arena.max_concurrency, show_progress="minimal") \
        .then(votable, [battle], list(buttons.values()), queue=False, api_visibility="private",
              show_progress="hidden")

    def vote(battle_id: str, choice: str, request: gr.Request) -> str:
        """A, B, tie or both_bad on a battle /arena ran in this session; the models' names and whether it was saved."""
        return arena.vote(getattr(request, "session_hash", None), battle_id, choice)

    def vote_for(choice: str):
        def on_click(battle_id: str, request: gr.Request) -> str:
            return vote(battle_id, choice, request)
        return on_click

    gr.api(vote, api_name="vote", concurrency_limit=None)  # counting a vote costs nothing worth queueing behind
    for choice, button in buttons.items():
        button.click(vote_for(choice), [battle], status, queue=False, api_visibility="private",
                     show_progress="hidden") \
            .then(locked, None, list(buttons.values()), queue=False, api_visibility="private", show_progress="hidden")
