"""The app as the benchmarks drive it: `python app.py` in its own process, and its /chat inputs built from the app's
own API description (GET /gradio_api/info), so a benchmark cannot drift from the sliders the app has.

A benchmark names the inputs it sets (`message`, `system_prompt`, `temperature`, ...: the chat function's parameter
names); every other input gets the app's default. An input the app no longer has, or a new one without a default,
ends the benchmark with one line naming the app's inputs, instead of a wrong request.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tools.live_app import LiveApp, live_app

ENDPOINT = "chat"  # the ChatInterface's api_name in chatbot/ui.py


@contextmanager
def running_app(settings: dict[str, str], timeout: float = 180) -> Iterator[LiveApp]:
    """`python app.py` with these CHATBOT_* settings on a free local port (tools/live_app.py), stopped on exit. Of
    this shell's CHATBOT_* variables only CHATBOT_LLAMA_REPACK is passed on (a machine whose repacked kernels work
    may turn them on for every benchmark); its log in a temporary folder, quoted if the app does not start."""
    repack = {k: v for k, v in os.environ.items() if k == "CHATBOT_LLAMA_REPACK"}
    with tempfile.TemporaryDirectory(prefix="chat-app-") as logs, \
            live_app({**repack, **settings}, Path(logs) / "app.log", timeout=timeout) as app:
        yield app


def chat_parameters(url: str) -> list[dict]:
    """The /chat endpoint's inputs as the running app describes them (name, default, ...), in order."""
    import httpx

    info = httpx.get(f"{url}gradio_api/info", timeout=30).json()
    return info["named_endpoints"][f"/{ENDPOINT}"]["parameters"]


def chat_inputs(parameters: list[dict], **values: Any) -> list:
    """The positional inputs of one /chat call: `values` by parameter name, the app's default for the rest."""
    names = [p["parameter_name"] for p in parameters]
    unknown = [k for k in values if k not in names]
    if unknown:
        sys.exit(f"the app's /{ENDPOINT} has no input {unknown[0]!r}; it has: {', '.join(names)}")
    missing = [p["parameter_name"] for p in parameters
               if p["parameter_name"] not in values and not p["parameter_has_default"]]
    if missing:
        sys.exit(f"the app's /{ENDPOINT} needs {missing[0]!r}, which this benchmark does not set; "
                 f"it has: {', '.join(names)}")
    return [values[p["parameter_name"]] if p["parameter_name"] in values else p["parameter_default"]
            for p in parameters]


def queue_inputs(url: str, inputs: list) -> list:
    """`inputs` (chat_inputs') as a raw POST /gradio_api/run/chat or /gradio_api/queue/join takes them: with a None
    for each input the API description leaves out (the chat's history state), from the page's config."""
    import httpx

    config = httpx.get(f"{url}config", timeout=30).json()
    hidden = {c["id"] for c in config["components"] if c.get("skip_api")}
    event = next(d for d in config["dependencies"] if d.get("api_name") == ENDPOINT)
    given = iter(inputs)
    return [None if i in hidden else next(given) for i in event["inputs"]]


def stream_over_http(url: str, inputs: list) -> Iterator[list]:
    """Each update of one /chat call through Gradio's plain HTTP API (POST /gradio_api/call/chat, then its
    server-sent events), as curl or a browser-like client sees it: the outputs [reply, ..., stats line].
    An error event ends it with Gradio's message."""
    import httpx

    with httpx.Client(timeout=120) as http:
        posted = http.post(f"{url}gradio_api/call/{ENDPOINT}", json={"data": inputs})
        posted.raise_for_status()
        event = posted.json()["event_id"]
        with http.stream("GET", f"{url}gradio_api/call/{ENDPOINT}/{event}") as events:
            kind = ""
            for line in events.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if kind == "error":
                        raise RuntimeError(f"/{ENDPOINT} answered with an error: {data}")
                    if data not in ("", "null"):
                        yield json.loads(data)
