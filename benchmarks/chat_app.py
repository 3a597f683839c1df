"""The app as the benchmarks drive it: `python app.py` in its own process, and its /chat inputs built from the app's
own API description (GET /gradio_api/info), so a benchmark cannot drift from the sliders the app has.

A benchmark names the inputs it sets (`message`, `system_prompt`, `temperature`, ...: the chat function's parameter
names); every other input gets the app's default. An input the app no longer has, or a new one without a default,
ends the benchmark with one line naming the app's inputs, instead of a wrong request.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from tools.ports import free_port
from training.paths import REPO_ROOT

ENDPOINT = "chat"  # the ChatInterface's api_name in chatbot/ui.py


def start_app(settings: dict[str, str], timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`python app.py` with these CHATBOT_* settings (none of this shell's CHATBOT_* / GRADIO_* variables but
    CHATBOT_LLAMA_REPACK) on a free local port; returns (process, url) once /gradio_api/info answers."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHATBOT_", "GRADIO_")) or k == "CHATBOT_LLAMA_REPACK"}
    env.update(settings, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill and stall the app
    server = subprocess.Popen([sys.executable, "app.py"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}gradio_api/info", timeout=5).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            server.wait()
            log.seek(0)
            sys.exit(f"app.py did not start ({settings}): {log.read()[-2000:]}")
        time.sleep(0.5)


def stop_app(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


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
