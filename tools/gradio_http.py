"""Calling a running Gradio chat app the way a browser - or a stranger - does: any event by its index in the page's
public config, over raw HTTP (POST /gradio_api/run/predict for events outside the queue, /gradio_api/queue/join and
its event stream for queued ones, with any JSON, NaN included), and a browser tab driven through gradio_client
(send a message, press Retry). Used by the abuse tests and benchmarks/bench_abuse.py."""
from __future__ import annotations

import json
import time
import uuid

import httpx


def text_message(role: str, text: str) -> dict:
    """A chat message as the browser sends the Chatbot's value."""
    return {"role": role, "content": [{"type": "text", "text": text}], "metadata": None, "options": None}


def dependency(url: str, api_name: str) -> tuple[dict, dict]:
    """An event as the page's public config describes it, and the page's values of every component."""
    config = httpx.get(f"{url}config", timeout=30).json()
    event = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
    values = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
    return event, values


def fn_index(url: str, api_name: str) -> int:
    return dependency(url, api_name)[0]["id"]


def post_run(url: str, api_name: str, data: list, event_data: dict | None = None,
             session: str | None = None) -> httpx.Response:
    """POST /gradio_api/run/predict: how the page calls an event outside the queue (feedback's). Inputs the caller
    leaves out are sent with the page's values, as the browser would."""
    event, values = dependency(url, api_name)
    data = data + [values.get(i) for i in event["inputs"][len(data):]]
    return httpx.post(f"{url}gradio_api/run/predict", timeout=120,
                      json={"data": data, "event_data": event_data, "fn_index": event["id"],
                            "session_hash": session or uuid.uuid4().hex})


def join_queue(url: str, api_name: str, data: list, session: str | None = None) -> list[tuple[float, dict]]:
    """Join the queue with a raw JSON body (NaN and all, as Python's json writes it) and read the event's stream to
    the end: (seconds since joining, message) pairs."""
    session, start = session or uuid.uuid4().hex, time.perf_counter()
    body = json.dumps({"data": data, "fn_index": fn_index(url, api_name), "session_hash": session,
                       "event_data": None, "trigger_id": None})
    joined = httpx.post(f"{url}gradio_api/queue/join", content=body, timeout=120,
                        headers={"content-type": "application/json"})
    joined.raise_for_status()
    messages = []
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session},
                      timeout=600) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                messages.append((time.perf_counter() - start, message))
                if message.get("msg") in ("process_completed", "close_stream"):
                    break
    return messages


def final_output(messages: list[tuple[float, dict]]) -> list:
    """The outputs of a queued event's last message (a failed event has none: an empty list)."""
    done = next(m for _, m in reversed(messages) if m.get("msg") == "process_completed")
    return (done.get("output") or {}).get("data") or []


def first_text_seconds(messages: list[tuple[float, dict]]) -> float | None:
    """When the first non-empty reply text arrived, in seconds since joining the queue."""
    return next((t for t, m in messages if m.get("msg") in ("process_generating", "process_completed")
                 and (m.get("output") or {}).get("data") and m["output"]["data"][0]), None)


class Tab:
    """One browser tab of a ChatInterface app, driven through the page's own events with gradio_client."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.url, self.client = url, Client(url, verbose=False)
        self.history: list[dict] = []

    @property
    def session(self) -> str:
        return self.client.session_hash

    def send(self, message: str, *settings) -> tuple[str, str]:
        """The reply and its stats line; `settings` as the Settings panel's inputs (system prompt, temperature, ...)."""
        reply, stats = self.client.predict(message, *settings, api_name="/chat")
        self.history += [text_message("user", message), text_message("assistant", reply)]
        return reply, stats

    def set_history(self, history: list[dict]) -> None:
        """Set the chat's server-side state from a Chatbot value, as the page does after every reply."""
        self.history = history
        self.client.predict(history, fn_index=fn_index(self.url, "lambda"))

    def retry(self, *settings) -> str:
        """What the Retry button runs: the chat's state from the page, its last turn popped, the reply again."""
        self.set_history(self.history)
        self.client.predict(fn_index=fn_index(self.url, "_pop_last_user_message"))
        history, _ = self.client.predict(*settings, fn_index=fn_index(self.url, "_submit_fn_2"))
        reply = history[-1]["content"][0]["text"]
        self.history[-1] = text_message("assistant", reply)
        return reply
