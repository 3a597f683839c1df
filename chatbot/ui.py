"""The Gradio app: a streaming ChatInterface over one backend (and, with CHATBOT_ARENA_MODEL, an Arena tab).

Each reply is checked and streamed by chatbot/reply.py; this module builds the page, its Settings inputs and the
queue that bounds every caller.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Iterator

import gradio as gr

from chatbot import feedback
from chatbot.arena import Arena
from chatbot.arena_tab import arena_tab
from chatbot.backends.base import Backend, GenerationParams, fresh_seed
from chatbot.history import build_messages, content_text, keep_recent, normalise, trim
from chatbot.reply import conversation_key, notice, read_number, refuse_message, stream_reply, too_long
from chatbot.settings import Settings

QUEUE_SIZE = 64         # requests waiting at once, every caller included; more are told the queue is full
MODEL_GROUP = "model"   # the concurrency group of the events that run the model
EXAMPLES = [
    "Hi! What can you help me with?",
    "Explain what a large language model is in two sentences.",
    "Write a haiku about the sea.",
    "Give me three tips for writing clean Python code.",
]


def lenient(slider: gr.Slider) -> gr.Slider:
    """A Settings slider that hands the chat function what an API caller sent even when it is not a number in
    range: respond() clamps it or answers with a notice naming the setting, where Gradio's own refusal would be a
    bare error. (Overridden on the instance: a subclass of a Gradio component writes a .pyi file beside this one.)"""
    strict = slider.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return strict(payload)
        except Exception:
            return payload

    slider.preprocess = preprocess
    return slider


def make_respond(settings: Settings, backend: Backend, on_reply: Callable[..., None] | None = None):
    """The ChatInterface function: (message, history, system prompt, temperature, top_p, max new tokens,
    repetition penalty, min-p); what an API caller leaves out comes from the settings. Every input is checked
    before it costs anything (no tokenising, no model lock): the message, the system prompt and the numbers are
    refused with a notice naming the limit, the oldest turns beyond CHATBOT_MAX_HISTORY_CHARS are left out.
    `on_reply(session, conversation, reply, system_prompt, params, dropped)` hears of every reply streamed."""

    def respond(message: Any, history: list, system_prompt: str | None = None, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: float | None = None, repeat_penalty: float | None = None,
                min_p: float | None = None, request: gr.Request = None) -> Iterator[tuple[str, str]]:
        text = content_text(message["text"] if isinstance(message, dict) and "text" in message else message)
        refused = refuse_message(settings, text)
        if refused is not None:
            yield refused, ""
            return
        system = settings.system_prompt if system_prompt is None else system_prompt
        if not isinstance(system, str):
            yield notice("The system prompt is not valid; accepted: text."), ""
            return
        if len(system) > settings.max_system_chars:
            yield notice(f"The system prompt is {len(system)} characters long; the limit is "
                         f"{settings.max_system_chars} (CHATBOT_MAX_SYSTEM_CHARS). Please shorten it."), ""
            return
        # API callers can send anything: clamp to what the sliders allow, refuse what is not a number.
        values = [read_number("Temperature", temperature, settings.temperature, 0.0, 2.0),
                  read_number("Top-p", top_p, settings.top_p, 0.01, 1.0),
                  read_number("Max new tokens", max_new_tokens or None, settings.max_new_tokens, 1, backend.n_ctx - 1),
                  read_number("Repetition penalty", repeat_penalty, settings.repeat_penalty, 1.0, 2.0),
                  read_number("Min-p", min_p, settings.min_p, 0.0, 1.0)]
        bad = next((v for v in values if isinstance(v, str)), None)
        if bad is not None:
            yield bad, ""
            return
        temperature, top_p, max_new_tokens, repeat_penalty, min_p = values
        session = getattr(request, "session_hash", None)
        conversation = normalise(list(history or []) + [{"role": "user", "content": text}])
        kept = keep_recent(conversation[:-1], settings.max_history_chars) + conversation[-1:]
        params = GenerationParams(
            max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p, min_p=min_p,
            repeat_penalty=repeat_penalty, seed=settings.seed if settings.seed is not None else fresh_seed(),
            conversation=conversation_key(session, conversation))
        messages = build_messages(system, kept[:-1], kept[-1]["content"])
        fitted = trim(messages, backend.count_tokens, backend.n_ctx, params.max_new_tokens)
        if fitted is None:
            yield too_long(backend, messages, params.max_new_tokens), ""
            return
        trimmed, _ = fitted
        over_limit = len(conversation) - len(kept)
        dropped = over_limit + len(messages) - len(trimmed)
        reply = ""
        try:
            for reply, stats in stream_reply(backend, trimmed, params, dropped=len(messages) - len(trimmed),
                                             over_limit=over_limit):
                yield reply, stats
        finally:  # also when the visitor stopped the reply: what they saw is what they can rate
            if on_reply is not None and session:
                on_reply(session, conversation, reply, system, params, dropped)

    return respond


def build_app(settings: Settings, backend: Backend, log: feedback.FeedbackLog | None = None,
              arena_backend: Backend | None = None):
    """The Gradio Blocks app, its queue set up; launch it with .launch() (app.py does). Feedback is recorded to
    `log`, else to the log the settings ask for (none unless CHATBOT_FEEDBACK_DIR is set). With `arena_backend`
    (CHATBOT_ARENA_MODEL's) the chat is one tab and the Arena (chatbot/arena_tab.py) another."""
    log = log or feedback.open_log(settings)
    collector = feedback.FeedbackCollector(log, settings, backend) if log is not None else None
    slider_max = max(settings.max_new_tokens, min(4096, backend.n_ctx // 2))
    with gr.Blocks(title=f"Chat · {backend.model_name}", fill_height=True) as demo, ExitStack() as chat_tab:
        if arena_backend is not None:
            chat_tab.enter_context(gr.Tab("Chat", id="chat"))
        # Rendered below the chat but created first: ChatInterface needs its additional outputs to exist.
        stats = gr.Markdown("", elem_id="reply-stats", render=False)
        chat = gr.ChatInterface(
            make_respond(settings, backend, collector.served if collector else None),
            title=f"Chat with {backend.model_name}",
            description=f"Backend `{backend.name}` · context {backend.n_ctx} tokens · replies stream as they "
                        "are generated; the stop button ends generation at once." + feedback.notice(settings),
            # render=False: created inside the outer Blocks they would render above the chat instead of
            # inside ChatInterface's folded accordion.
            additional_inputs=[
                gr.Textbox(settings.system_prompt, label="System prompt", lines=2, render=False),
                *map(lenient, [
                    gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature", render=False),
                    gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p", render=False),
                    gr.Slider(1, slider_max, value=settings.max_new_tokens, step=1, label="Max new tokens",
                              render=False),
                    gr.Slider(1.0, 2.0, value=settings.repeat_penalty, step=0.05, label="Repetition penalty",
                              info="1 = off; higher stops small models from repeating themselves", render=False),
                    gr.Slider(0.0, 1.0, value=settings.min_p, step=0.01, label="Min-p",
                              info="drop tokens less likely than this × the likeliest one; 0 = off", render=False),
                ]),
            ],
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            additional_outputs=[stats],
            examples=[[e] for e in EXAMPLES],
            cache_examples=False,  # caching would run the model at start-up, before anyone asks
            api_name="chat",
            concurrency_limit=backend.max_concurrency,
            fill_height=True,
            # What chat demos offer today: conversations kept in the visitor's browser (localStorage) across
            # reloads, listed in a side panel with "New chat"; and editing a sent message to regenerate from it.
            save_history=True,
            editable=True,
        )
        stats.render()
        if collector is not None:  # thumbs/retry -> records, when CHATBOT_FEEDBACK_DIR is set
            feedback.attach(demo, chat, collector)
        if arena_backend is not None:
            chat_tab.close()  # the Chat tab ends here
            with gr.Tab("Arena", id="arena"):
                arena_tab(settings, Arena(settings, backend, arena_backend, collector))
    # One concurrency group for every event that runs the model: the chat's own events (send, retry, edit, each
    # ChatInterface wires to its own function), its /chat API and the Arena's battles, which would otherwise each get
    # the backend's limit and together send it several times that many requests, waiting inside the backend where
    # Gradio's queue cannot show or bound them. Here the events that run a model are exactly those given a number as
    # concurrency_limit (Gradio keeps the lowest limit of a group: the Arena's, when its model takes fewer).
    for fn in demo.fns.values():
        if isinstance(fn.concurrency_limit, int):
            fn.concurrency_id = MODEL_GROUP
    # The queue's bound holds for every caller: api_open=False closes the direct POST /gradio_api/run/chat route,
    # which would otherwise skip both the queue (max_size) and the event's concurrency_limit. gradio_client and
    # /gradio_api/call/chat go through the queue.
    return demo.queue(max_size=QUEUE_SIZE, api_open=False)
