"""Visitor feedback on the chat, saved as training records - only when the Space's owner turns it on.

CHATBOT_FEEDBACK_DIR=DIR appends one JSON line per signal to DIR/feedback-<random>.jsonl (one file per process, so
several workers never write the same file); CHATBOT_FEEDBACK_DATASET=owner/name also pushes that folder to a private
Hub dataset repo every few minutes with huggingface_hub's CommitScheduler. Signals:

    up / down   the visitor's thumbs on a reply (a later click replaces it; un-clicking records rating null)
    retried     a reply the visitor regenerated (discarded)
    kept        the reply the visitor went on with after regenerating that turn

A record is what training needs and nothing more: the conversation up to the rated reply (system prompt included,
openai messages format), the reply, the rating, the model served and the sampling settings on the page when it was
rated, a UTC timestamp and a random conversation id. No IP, headers, cookies or session ids.
training/data/preference.py reads these files directly (thumbs -> KTO labels, retried + kept -> DPO pairs).
"""

import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from chatbot.history import NOTICE, content_text, normalise
from chatbot.settings import ConfigError, Settings

RATINGS = ("up", "down", "retried", "kept", None)
PUSH_EVERY_MINUTES = 5    # CommitScheduler's default: a Space restart loses at most this much on the Hub side
MAX_SESSIONS = 10_000     # conversation ids kept in memory; the oldest sessions are forgotten first


class FeedbackLog:
    """Thread-safe JSONL writer: one line per record, written and flushed under one lock (the scheduler's, when
    pushing, so a commit never uploads half a line)."""

    def __init__(self, folder: str | Path, dataset: str | None = None, *, token: str | None = None,
                 hf_api: Any = None, every: float = PUSH_EVERY_MINUTES):
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"feedback-{uuid.uuid4().hex[:12]}.jsonl"
        self.dataset = dataset
        self.scheduler = None
        if dataset:
            from huggingface_hub import CommitScheduler

            self.scheduler = CommitScheduler(repo_id=dataset, repo_type="dataset", folder_path=self.folder,
                                             path_in_repo="data", private=True, every=every, token=token,
                                             hf_api=hf_api, allow_patterns=["*.jsonl"])
        self.lock = self.scheduler.lock if self.scheduler else threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def push_now(self):
        """Commit what is there now (tests, shutdown); None when not pushing."""
        return self.scheduler.trigger().result() if self.scheduler else None


def where(settings: Settings) -> str:
    """Where records go, in words, for the notice on the page."""
    dataset = f" and pushed to the Hugging Face dataset `{settings.feedback_dataset}`" \
        if settings.feedback_dataset else ""
    return f"saved on this server (`{settings.feedback_dir}`){dataset}"


def notice(settings: Settings) -> str:
    """The sentence the page shows while feedback is on; empty when it is off."""
    if not settings.feedback_dir:
        return ""
    return (f" **Conversations and ratings on this page are {where(settings)}** to improve the model; "
            "do not share personal information.")


def model_info(settings: Settings, backend) -> dict:
    default = "embedded" if backend.name == "llama_cpp" else getattr(backend, "model_name", None)
    return {"backend": backend.name, "model": settings.model or default,
            "file": getattr(backend, "model_name", None) if backend.name == "llama_cpp" else settings.gguf_file,
            "adapter": settings.adapter, "revision": settings.revision}


def prompt_and_reply(history: list, index: int, system_prompt: str | None) -> tuple[list[dict], str] | None:
    """(conversation before message `index`, with the system prompt, in openai format; the reply at `index`, with
    any assistant messages right after it in the same bubble). None for an app notice or an empty reply."""
    items = list(history or [])
    if not 0 <= index < len(items):
        return None
    reply_parts = []
    for item in items[index:]:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        if role != "assistant":
            break
        reply_parts.append(content_text(item.get("content") if isinstance(item, dict) else item.content))
    reply = "\n".join(p for p in reply_parts if p)
    if not reply.strip() or reply.startswith(NOTICE):
        return None
    messages = normalise(items[:index])
    if not messages or messages[-1]["role"] != "user":
        return None
    system = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    return system + messages, reply


class FeedbackCollector:
    """The event handlers attached to the chat. Per browser session it keeps only a random conversation id and the
    turns regenerated and not yet followed up, in memory; nothing about the visitor is written."""

    def __init__(self, log: FeedbackLog, settings: Settings, backend):
        self.log, self.settings, self.model = log, settings, model_info(settings, backend)
        self.lock = threading.Lock()
        self.sessions: OrderedDict[str, dict] = OrderedDict()

    def _session(self, key: str | None) -> dict:
        with self.lock:
            state = self.sessions.pop(key or "", None) or {"conversation_id": uuid.uuid4().hex, "retried": set()}
            self.sessions[key or ""] = state
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            return state

    def record(self, state: dict, messages: list[dict], reply: str, rating: str | None, sampling: dict) -> dict:
        assert rating in RATINGS
        record = {"conversation_id": state["conversation_id"],
                  "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "messages": messages, "reply": reply, "rating": rating,
                  "model": self.model, "sampling": sampling}
        self.log.write(record)
        return record

    def sampling(self, values: dict) -> dict:
        """The page's generation settings (every Settings input but the system prompt) and the server's seed."""
        return {**{k: v for k, v in values.items() if k != "system_prompt"}, "seed": self.settings.seed}

    # Event handlers. `values`: the chat's Settings inputs by name (system_prompt, temperature, top_p, ...).

    def on_like(self, history, values: dict, data, request) -> None:
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        found = prompt_and_reply(history, int(index), values.get("system_prompt"))
        if found is None:
            return
        rating = "up" if data.liked is True else "down" if data.liked is False else None
        self.record(self._session(request.session_hash), *found, rating, self.sampling(values))

    def on_retry(self, history, values: dict, data, request) -> None:
        # data.index is the last user message; the replies after it are the ones thrown away.
        found = prompt_and_reply(history, int(data.index) + 1, values.get("system_prompt"))
        if found is None:
            return
        state = self._session(request.session_hash)
        self.record(state, *found, "retried", self.sampling(values))
        state["retried"].add(json.dumps(found[0], sort_keys=True))

    def on_submit(self, history, values: dict, request) -> None:
        """A new message: the reply the visitor went on with is 'kept' when that turn had been regenerated."""
        state = self._session(request.session_hash)
        if not state["retried"] or not history:
            return
        last_user = max((i for i, m in enumerate(history)
                         if (m.get("role") if isinstance(m, dict) else getattr(m, "role", None)) == "user"),
                        default=None)
        found = None if last_user is None else prompt_and_reply(history, last_user + 1, values.get("system_prompt"))
        if found is not None and json.dumps(found[0], sort_keys=True) in state["retried"]:
            state["retried"].discard(json.dumps(found[0], sort_keys=True))
            self.record(state, *found, "kept", self.sampling(values))

    def on_clear(self, request) -> None:
        with self.lock:  # a cleared chat is a new conversation
            self.sessions.pop(request.session_hash or "", None)


def input_name(component) -> str:
    """'Max new tokens' -> 'max_new_tokens': the key a Settings input's value is recorded under."""
    return re.sub(r"\W+", "_", str(getattr(component, "label", "") or "").lower()).strip("_")


def open_log(settings: Settings, hf_api: Any = None) -> FeedbackLog | None:
    """The log the settings ask for, or None. A Hub dataset that cannot be created or written is a ConfigError."""
    if not settings.feedback_dir:
        return None
    if not settings.feedback_dataset:
        return FeedbackLog(settings.feedback_dir)
    from huggingface_hub import get_token

    if hf_api is None and not get_token():
        raise ConfigError(f"CHATBOT_FEEDBACK_DATASET={settings.feedback_dataset!r} is not valid without a token; "
                          "accepted: a dataset repo id you can write to, with a write token in HF_TOKEN")
    try:
        return FeedbackLog(settings.feedback_dir, settings.feedback_dataset, hf_api=hf_api)
    except Exception as exc:  # no token, no write access, offline: say which setting to change
        raise ConfigError(f"CHATBOT_FEEDBACK_DATASET={settings.feedback_dataset!r} is not valid: "
                          f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; "
                          "accepted: a dataset repo id you can write to, with a write token in HF_TOKEN") from None


def attach(chat, settings: Settings, backend, log: FeedbackLog | None = None) -> FeedbackCollector | None:
    """Thumbs, retry and follow-up listeners on a gr.ChatInterface (inside its gr.Blocks); None when feedback is off.
    Its additional inputs (the Settings panel) are recorded by label; the one labelled "System prompt" goes into
    the messages."""
    import gradio as gr

    log = log or open_log(settings)
    if log is None:
        return None
    collector = FeedbackCollector(log, settings, backend)
    names = [input_name(c) for c in chat.additional_inputs]  # system_prompt, temperature, top_p, ...
    inputs = [chat.chatbot, *chat.additional_inputs]

    # Gradio passes event data and the request to positional parameters annotated with their types; they come
    # first so that the chat's Settings inputs, however many, follow as *values.
    def on_like(data: gr.LikeData, request: gr.Request, history, *values):
        collector.on_like(history, dict(zip(names, values)), data, request)

    def on_retry(data: gr.RetryData, request: gr.Request, history, *values):
        collector.on_retry(history, dict(zip(names, values)), data, request)

    def on_submit(request: gr.Request, history, *values):
        collector.on_submit(history, dict(zip(names, values)), request)

    def on_clear(request: gr.Request):
        collector.on_clear(request)

    common = dict(queue=False, api_visibility="undocumented", show_progress="hidden")
    chat.chatbot.like(on_like, inputs, None, **common)
    chat.chatbot.retry(on_retry, inputs, None, **common)
    chat.textbox.submit(on_submit, inputs, None, **common)
    chat.chatbot.clear(on_clear, None, None, **common)
    for start in (getattr(chat, "new_chat_button", None), getattr(chat, "chat_history_dataset", None)):
        if start is not None:  # save_history: "New chat" or a saved chat opened is another conversation
            start.click(on_clear, None, None, **common)
    return collector
