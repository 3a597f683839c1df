"""Visitor feedback on the chat, saved as training records - only when the Space's owner turns it on.

CHATBOT_FEEDBACK_DIR=DIR appends one JSON line per signal to DIR/feedback-<random>.jsonl (one file per process, so
several workers never write the same file); CHATBOT_FEEDBACK_DATASET=owner/name also pushes that folder to a private
Hub dataset repo every few minutes with huggingface_hub's CommitScheduler, and once more when the app is stopped
(SIGTERM/SIGINT, waiting at most EXIT_PUSH_SECONDS). Signals:

    up / down   the visitor's thumbs on a reply (a later click replaces it; un-clicking records rating null)
    retried     a reply the visitor regenerated (discarded)
    kept        the reply the visitor went on with after regenerating that turn

Every event can be sent by anyone over HTTP, so a record is written only for a reply this server streamed in that
browser session (served_replies.py keeps a digest of each, bounded); anything else is refused, counted and never
written. The record carries the system prompt and sampling settings (seed included) the reply was generated with,
and the conversation as the model saw it. Limits: MAX_RECORD_BYTES a record, MAX_SESSION_BYTES a session, and
CHATBOT_FEEDBACK_MAX_MB for the folder's records in all; past it recording stops (one log line, and the page says
so) and nothing already saved is touched.

A record is what training needs and nothing more: the conversation up to the rated reply, the reply, the rating,
the model served, the sampling settings, a UTC timestamp and a random conversation id. No IP, headers, cookies or
session ids. training/data/preference.py reads these files directly (thumbs -> KTO labels, retried + kept -> DPO
pairs).
"""

import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from chatbot.backends.base import GenerationParams
from chatbot.history import NOTICE, content_text, normalise
from chatbot.served_replies import (IDLE_SECONDS, MAX_BYTES, MAX_REPLIES_PER_SESSION, MAX_SESSIONS, Served,
                                    SessionLedger, digest)
from chatbot.session_store import SessionStore
from chatbot.settings import ConfigError, Settings

RATINGS = ("up", "down", "retried", "kept", None)
PUSH_EVERY_MINUTES = 5      # CommitScheduler's default; a stop (SIGTERM/SIGINT) pushes at once
EXIT_PUSH_SECONDS = 20      # the longest a stopping app waits for that last push
MAX_RECORD_BYTES = 256 * 2**10  # one record; with the default input limits a record is at most ~60,000 characters
MAX_SESSION_BYTES = 8 * 2**20   # all records of one browser session


class FeedbackLog:
    """Thread-safe JSONL writer: one line per record, written and flushed under one lock (the scheduler's, when
    pushing, so a commit never uploads half a line). `total` counts the bytes of the folder's *.jsonl files (those
    there at start, and every line written since)."""

    def __init__(self, folder: str | Path, dataset: str | None = None, *, token: str | None = None,
                 hf_api: Any = None, every: float = PUSH_EVERY_MINUTES):
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"feedback-{uuid.uuid4().hex[:12]}.jsonl"
        self.total = sum(f.stat().st_size for f in self.folder.glob("*.jsonl") if f.is_file())
        self.dataset = dataset
        self.scheduler = None
        if dataset:
            from huggingface_hub import CommitScheduler

            self.scheduler = CommitScheduler(repo_id=dataset, repo_type="dataset", folder_path=self.folder,
                                             path_in_repo="data", private=True, every=every, token=token,
                                             hf_api=hf_api, allow_patterns=["*.jsonl"])
        self.lock = self.scheduler.lock if self.scheduler else threading.Lock()

    @staticmethod
    def encode(record: dict) -> bytes:
        """One JSON line; strict JSON (a NaN or infinity is an error, never a bare NaN in the file)."""
        return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8", "surrogatepass")

    def append(self, line: bytes) -> None:
        with self.lock, self.path.open("ab") as f:
            f.write(line)
            f.flush()
            self.total += len(line)

    def write(self, record: dict) -> None:
        self.append(self.encode(record))

    def push_now(self):
        """Commit what is there now (tests, shutdown); None when not pushing."""
        return self.scheduler.trigger().result() if self.scheduler else None

    def push_soon(self) -> None:
        """Start a push without waiting for it (close() waits for the last one)."""
        if self.scheduler is not None:
            self.scheduler.trigger()

    def close(self, timeout: float = EXIT_PUSH_SECONDS) -> bool:
        """Push what is pending, waiting at most `timeout` seconds, and stop the scheduler (so its exit hook does
        not push again, unbounded). True when everything was pushed, or there is nothing to push to."""
        if self.scheduler is None:
            return True
        future = self.scheduler.trigger()
        try:
            future.result(timeout=timeout)
            return True
        except Exception as exc:  # a timeout, no connection, a refused token: say so in the log, then exit anyway
            print(f"feedback: the last push to {self.dataset} did not finish ({type(exc).__name__}); records written "
                  f"since the previous push are still in {self.folder}", file=sys.stderr)
            return False
        finally:
            self.scheduler.stop()


def where(settings: Settings) -> str:
    """Where records go, in words, for the notice on the page."""
    dataset = f" and pushed to the Hugging Face dataset `{settings.feedback_dataset}`" \
        if settings.feedback_dataset else ""
    return f"saved on this server (`{settings.feedback_dir}`){dataset}"


def notice(settings: Settings, what: str = "Conversations and ratings") -> str:
    """The sentence the page shows while feedback is on (`what` is saved); empty when it is off."""
    if not settings.feedback_dir:
        return ""
    return (f" **{what} on this page are {where(settings)}** to improve the model; "
            "do not share personal information.")


def model_info(settings: Settings, backend) -> dict:
    default = "embedded" if backend.name == "llama_cpp" else getattr(backend, "model_name", None)
    return {"backend": backend.name, "model": settings.model or default,
            "file": getattr(backend, "model_name", None) if backend.name == "llama_cpp" else settings.gguf_file,
            "adapter": settings.adapter, "revision": settings.revision}


def role_of(item: Any) -> Any:
    return item.get("role") if isinstance(item, dict) else getattr(item, "role", None)


def prompt_and_reply(history: list, index: int) -> tuple[list[dict], str] | None:
    """(conversation before message `index`, normalised; the reply at `index`, with any assistant messages right
    after it in the same bubble). None for an app notice, an empty reply or an index that is not a reply."""
    items = list(history or []) if isinstance(history, list) else []
    if not 0 <= index < len(items):
        return None
    reply_parts = []
    for item in items[index:]:
        if role_of(item) != "assistant":
            break
        reply_parts.append(content_text(item.get("content") if isinstance(item, dict) else item.content))
    reply = "\n".join(p for p in reply_parts if p)
    if not reply.strip() or reply.startswith(NOTICE):
        return None
    messages = normalise(items[:index])
    if not messages or messages[-1]["role"] != "user":
        return None
    return messages, reply


def event_index(value: Any) -> int | None:
    """LikeData/RetryData.index as an int (Gradio sends [row, column] for likes), None when it is not one."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class FeedbackCollector:
    """The event handlers attached to the chat, and `served`, which the chat calls after every reply it streams.

    Per browser session it keeps a SessionLedger (served_replies.py) in a bounded SessionStore; nothing about the
    visitor is written. Each handler returns a line for the page, or None when there is nothing to say."""

    def __init__(self, log: FeedbackLog, settings: Settings, backend):
        self.log, self.settings, self.model = log, settings, model_info(settings, backend)
        self.max_total = settings.feedback_max_mb * 2**20
        self.lock = threading.Lock()
        self.sessions: SessionStore[SessionLedger] = SessionStore(
            SessionLedger, max_sessions=MAX_SESSIONS, max_bytes=MAX_BYTES, idle_seconds=IDLE_SECONDS)
        self.refused = 0      # events naming a reply this server did not stream in that session
        self.stopped = False  # CHATBOT_FEEDBACK_MAX_MB reached

    # Called by the chat (ui.make_respond) with every reply it streamed.

    def served(self, session: str, conversation: list[dict], reply: str, system_prompt: str,
               params: GenerationParams, dropped: int) -> None:
        if not reply.strip() or reply.startswith(NOTICE):
            return
        served = Served(system_prompt=system_prompt, params=params, dropped=dropped, prompt=digest(conversation))
        with self.lock:
            ledger = self.sessions.use(session)
            self.sessions.charge(session, ledger.add(digest(conversation, reply), served))

    # Checks and writing.

    def status(self) -> str | None:
        """The line the page shows once recording has stopped."""
        if not self.stopped:
            return None
        return (f"{NOTICE}Ratings are no longer recorded: this server's feedback records reached "
                f"CHATBOT_FEEDBACK_MAX_MB={self.settings.feedback_max_mb}.")

    def vouch(self, ledger: SessionLedger, history: list, index: int | None) -> tuple[list[dict], str, Served] | None:
        """(conversation, reply, how it was served) when the reply at `index` is one this session was streamed."""
        found = None if index is None else prompt_and_reply(history, index)
        if found is None:
            return None
        served = ledger.served.get(digest(*found))
        return None if served is None else (*found, served)

    def refuse(self) -> str:
        self.refused += 1
        if self.refused in (1, 10) or self.refused % 100 == 0:
            print(f"feedback: {self.refused} events refused so far (a reply this server did not stream in that "
                  "session, or one it no longer remembers); nothing was written for them", file=sys.stderr)
        return (f"{NOTICE}That rating was not saved: this server does not know that reply (it remembers the last "
                f"{MAX_REPLIES_PER_SESSION} replies of a session for an hour).")

    def record(self, ledger: SessionLedger, found: tuple[list[dict], str, Served], rating: str | None) -> str | None:
        """Write one record within the limits; the page's line when it was not written."""
        assert rating in RATINGS
        conversation, reply, served = found
        system = [{"role": "system", "content": served.system_prompt}] if served.system_prompt.strip() else []
        line = self.log.encode({"conversation_id": ledger.conversation_id,
                                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "messages": system + conversation[served.dropped:], "reply": reply, "rating": rating,
                                "model": self.model, "sampling": served.sampling()})
        return self.append(ledger, line)

    def append(self, ledger: SessionLedger, line: bytes, what: str = "rating") -> str | None:
        """Write one encoded record of the session within the limits; the page's line when it was not written."""
        if self.stopped:
            return self.status()
        if len(line) > MAX_RECORD_BYTES:
            return f"{NOTICE}That {what} was not saved: its record would be {len(line) // 1024} KiB, over the " \
                   f"{MAX_RECORD_BYTES // 1024} KiB a record may take."
        if ledger.written + len(line) > MAX_SESSION_BYTES:
            return f"{NOTICE}{what.capitalize()}s from this page are no longer saved: it reached the " \
                   f"{MAX_SESSION_BYTES // 2**20} MiB a session may record."
        if self.log.total + len(line) > self.max_total:
            self.stopped = True
            print(f"feedback: recording stopped: the records in {self.log.folder} reached "
                  f"CHATBOT_FEEDBACK_MAX_MB={self.settings.feedback_max_mb}; everything saved so far is kept",
                  file=sys.stderr)
            return self.status()
        self.log.append(line)
        ledger.written += len(line)
        return None

    def write(self, session: str, record: dict, what: str) -> str | None:
        """Another kind of record from this session (the Arena's votes, which vouches for them itself), within the
        same limits as the ratings; the page's line when it was not written."""
        with self.lock:
            return self.append(self.sessions.use(session), self.log.encode(record), what)

    # Event handlers: `history` is the chat as the page (or any caller) sends it, `session` its session hash.

    def on_like(self, session: str | None, history: list, index: Any, liked: Any) -> str | None:
        with self.lock:
            ledger = self.sessions.use(session or "")
            found = self.vouch(ledger, history, event_index(index))
            if found is None:
                return self.refuse()
            rating = "up" if liked is True else "down" if liked is False else None
            return self.record(ledger, found, rating)

    def on_retry(self, session: str | None, history: list, index: Any) -> str | None:
        # index is the last user message; the replies after it are the ones thrown away.
        with self.lock:
            ledger = self.sessions.use(session or "")
            user = event_index(index)
            found = None if user is None else self.vouch(ledger, history, user + 1)
            if found is None:
                return self.refuse()
            ledger.mark_retried(found[2].prompt)
            return self.record(ledger, found, "retried")

    def on_submit(self, session: str | None, history: list) -> str | None:
        """A new message: the reply the visitor went on with is 'kept' when that turn had been regenerated."""
        with self.lock:
            ledger = self.sessions.use(session or "")
            if not ledger.retried or not isinstance(history, list) or not history:
                return None
            last_user = max((i for i, m in enumerate(history) if role_of(m) == "user"), default=None)
            found = None if last_user is None else self.vouch(ledger, history, last_user + 1)
            if found is None or found[2].prompt not in ledger.retried:
                return None  # an ordinary next message: nothing to record
            del ledger.retried[found[2].prompt]
            return self.record(ledger, found, "kept")

    def on_clear(self, session: str | None) -> None:
        """A cleared chat (or "New chat") is a new conversation; the replies served stay rateable."""
        with self.lock:
            ledger = self.sessions.use(session or "")
            ledger.conversation_id = uuid.uuid4().hex
            ledger.retried.clear()


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


def attach(demo, chat, collector: FeedbackCollector) -> None:
    """Thumbs, retry and follow-up listeners on a gr.ChatInterface (inside its gr.Blocks `demo`), and a status line
    under the chat that says when a rating was not saved or recording has stopped."""
    import gradio as gr

    status = gr.Markdown("", elem_id="feedback-status")

    def show(line: str | None):
        return gr.skip() if line is None else line

    # Gradio passes event data and the request to parameters annotated with their types.
    def on_like(data: gr.LikeData, request: gr.Request, history):
        return show(collector.on_like(request.session_hash, history, data.index, data.liked))

    def on_retry(data: gr.RetryData, request: gr.Request, history):
        return show(collector.on_retry(request.session_hash, history, data.index))

    def on_submit(request: gr.Request, history):
        return show(collector.on_submit(request.session_hash, history))

    def on_clear(request: gr.Request):
        collector.on_clear(request.session_hash)

    def on_load():
        return show(collector.status())

    common = dict(queue=False, api_visibility="undocumented", show_progress="hidden")
    chat.chatbot.like(on_like, [chat.chatbot], status, **common)
    chat.chatbot.retry(on_retry, [chat.chatbot], status, **common)
    chat.textbox.submit(on_submit, [chat.chatbot], status, **common)
    chat.chatbot.clear(on_clear, None, None, **common)
    for start in (getattr(chat, "new_chat_button", None), getattr(chat, "chat_history_dataset", None)):
        if start is not None:  # save_history: "New chat" or a saved chat opened is another conversation
            start.click(on_clear, None, None, **common)
    demo.load(on_load, None, status, **common)
