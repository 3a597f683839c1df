"""The Gradio app: a streaming ChatInterface over one backend.

The backend decodes in a producer thread while the Gradio generator drains whatever text has arrived, so decoding
never waits for the UI and updates go out at most every STREAM_INTERVAL seconds. Stop closes the generator; its
`finally` sets the cancel event, the backend returns at the next token and releases the model.
"""
from __future__ import annotations

import contextvars
import queue
import sys
import threading
import time
import traceback
from typing import Any, Iterator

from chatbot import feedback
from chatbot.backends.base import Backend, GenerationParams
from chatbot.history import NOTICE, build_messages, content_text, normalise, trim
from chatbot.settings import Settings
from chatbot.timing import ReplyClock

STREAM_INTERVAL = 0.05  # seconds between UI updates while streaming
EXAMPLES = [
    "Hi! What can you help me with?",
    "Explain what a large language model is in two sentences.",
    "Write a haiku about the sea.",
    "Give me three tips for writing clean Python code.",
]


def notice(text: str) -> str:
    return NOTICE + text


def format_stats(clock: ReplyClock, finish: str | None, dropped: int) -> str:
    """One unobtrusive line under the chat: tokens, decode speed, time to first token, why it ended."""
    if clock.ttft is None:
        return ""
    tps = clock.decode_tps
    speed = f"{tps:.1f} tokens/s" if tps is not None else "– tokens/s"
    parts = [f"{clock.tokens} tokens", speed, f"first token {clock.ttft:.2f} s"]
    if finish == "length":
        parts.append("stopped at max new tokens")
    elif finish == "cancelled":
        parts.append("stopped")
    if dropped:
        parts.append(f"{dropped} oldest messages left out to fit the context")
    return " · ".join(parts)


def stream_reply(backend: Backend, messages: list[dict], params: GenerationParams,
                 dropped: int = 0) -> Iterator[tuple[str, str]]:
    """(reply so far, stats line) pairs while the backend streams in a producer thread."""
    items: queue.SimpleQueue = queue.SimpleQueue()
    cancel = threading.Event()

    def produce() -> None:
        try:
            for chunk in backend.stream(messages, params, cancel):
                items.put((time.perf_counter(), chunk))
        except Exception as exc:  # shown in the reply below; the traceback goes to the server log
            traceback.print_exc(file=sys.stderr)
            items.put((time.perf_counter(), exc))
        finally:
            items.put(None)

    clock = ReplyClock()
    text, finish = "", None
    # In a copy of the caller's context: on ZeroGPU, spaces.GPU reads the visitor's request (whose quota pays for
    # the GPU) from Gradio's context variables, which a plain thread would not see.
    producer = threading.Thread(target=contextvars.copy_context().run, args=(produce,), name="backend-stream",
                                daemon=True)
    producer.start()
    try:
        done, next_update = False, clock.start
        while not done:
            batch = [items.get()]
            # Gather what arrives until the next update is due; the end of the stream is sent at once.
            while batch[-1] is not None:
                try:
                    batch.append(items.get(timeout=max(0.0, next_update - time.perf_counter())))
                except queue.Empty:
                    break
            for item in batch:
                if item is None:
                    done = True
                    break
                at, chunk = item
                if isinstance(chunk, Exception):
                    text += ("\n\n" if text else "") + notice(f"The model failed: {type(chunk).__name__}: {chunk}")
                    continue
                clock.add(chunk.text, chunk.tokens, at)
                text += chunk.text
                finish = chunk.finish_reason or finish
            yield text, format_stats(clock, finish, dropped)
            next_update = time.perf_counter() + STREAM_INTERVAL
    finally:
        # Also reached when Gradio closes the generator (stop button, client gone): end decoding now.
        cancel.set()
        producer.join()


def make_respond(settings: Settings, backend: Backend):
    """The ChatInterface function: (message, history, system prompt, temperature, top_p, max new tokens,
    repetition penalty, min-p); what an API caller leaves out comes from the settings."""

    def respond(message: Any, history: list, system_prompt: str | None = None, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: float | None = None, repeat_penalty: float | None = None,
                min_p: float | None = None) -> Iterator[tuple[str, str]]:
        text = content_text(message["text"] if isinstance(message, dict) and "text" in message else message)
        if not text.strip():
            yield notice("Please type a message."), ""
            return
        if len(text) > settings.max_input_chars:
            yield notice(f"Your message is {len(text)} characters long; the limit is {settings.max_input_chars} "
                         "(CHATBOT_MAX_INPUT_CHARS). Please shorten it."), ""
            return
        # API callers can send anything: clamp to what the sliders allow instead of failing mid-request.
        params = GenerationParams(
            max_new_tokens=max(1, min(int(max_new_tokens or settings.max_new_tokens), backend.n_ctx - 1)),
            temperature=min(max(float(settings.temperature if temperature is None else temperature), 0.0), 2.0),
            top_p=min(max(float(settings.top_p if top_p is None else top_p), 0.01), 1.0),
            min_p=min(max(float(settings.min_p if min_p is None else min_p), 0.0), 1.0),
            repeat_penalty=min(max(float(settings.repeat_penalty if repeat_penalty is None else repeat_penalty),
                                   1.0), 2.0),
            seed=settings.seed)
        system = settings.system_prompt if system_prompt is None else system_prompt
        messages = build_messages(system, normalise(history), text)
        fitted = trim(messages, backend.count_tokens, backend.n_ctx, params.max_new_tokens)
        if fitted is None:
            alone = backend.count_tokens(messages[:1] + messages[-1:] if len(messages) > 1 else messages)
            yield notice(f"Your message is too long for this model: it needs {alone} tokens plus "
                         f"{params.max_new_tokens} new tokens, and the context holds {backend.n_ctx}. "
                         "Please shorten it or lower “Max new tokens”."), ""
            return
        trimmed, _ = fitted
        yield from stream_reply(backend, trimmed, params, dropped=len(messages) - len(trimmed))

    return respond


def build_app(settings: Settings, backend: Backend):
    """The Gradio Blocks app; launch it with .launch() (app.py does)."""
    import gradio as gr

    slider_max = max(settings.max_new_tokens, min(4096, backend.n_ctx // 2))
    with gr.Blocks(title=f"Chat · {backend.model_name}", fill_height=True) as demo:
        # Rendered below the chat but created first: ChatInterface needs its additional outputs to exist.
        stats = gr.Markdown("", elem_id="reply-stats", render=False)
        chat = gr.ChatInterface(
            make_respond(settings, backend),
            title=f"Chat with {backend.model_name}",
            description=f"Backend `{backend.name}` · context {backend.n_ctx} tokens · replies stream as they "
                        "are generated; the stop button ends generation at once." + feedback.notice(settings),
            # render=False: created inside the outer Blocks they would render above the chat instead of
            # inside ChatInterface's folded accordion.
            additional_inputs=[
                gr.Textbox(settings.system_prompt, label="System prompt", lines=2, render=False),
                gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature", render=False),
                gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p", render=False),
                gr.Slider(1, slider_max, value=settings.max_new_tokens, step=1, label="Max new tokens",
                          render=False),
                gr.Slider(1.0, 2.0, value=settings.repeat_penalty, step=0.05, label="Repetition penalty",
                          info="1 = off; higher stops small models from repeating themselves", render=False),
                gr.Slider(0.0, 1.0, value=settings.min_p, step=0.01, label="Min-p",
                          info="drop tokens less likely than this × the likeliest one; 0 = off", render=False),
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
        feedback.attach(chat, settings, backend)  # thumbs/retry -> records, when CHATBOT_FEEDBACK_DIR is set
    return demo
