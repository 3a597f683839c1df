"""Where the app's time to first token goes, for each client: the app in this process, its backend wrapped
with timestamps, asked over Gradio's plain HTTP streaming API and over gradio_client.

    python benchmarks/ttft_breakdown.py [--runs 7] [--threads 2]

Per client, medians in ms from the request: the chat function starts (request path and queue), the backend
yields its first text (prompt processing), the app yields it to Gradio, and the client sees it. The backend's
own share is what raw llama-cpp-python would take; everything else is the app, Gradio and the client.
Both clients run in this process, so their CPU use competes with llama.cpp's threads, as a client on the
same 2-core box does in benchmarks/bench_app.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

import chatbot.ui as ui
from benchmarks.chat_app import chat_inputs, chat_parameters, stream_over_http
from chatbot.backends import load_backend
from chatbot.settings import load_settings
from tools.ports import free_port

PROMPT = "Explain what a large language model is."
STAGES = ("function starts", "backend first text", "app yields it", "client sees it")


def instrument(backend, marks: dict) -> None:
    """Timestamp the first text out of the backend and out of the app's stream, without changing either."""
    stream, stream_reply = backend.stream, ui.stream_reply

    def timed_stream(messages, params, cancel):
        for chunk in stream(messages, params, cancel):
            if chunk.text:
                marks.setdefault("backend first text", time.perf_counter())
            yield chunk

    def timed_stream_reply(*args, **kwargs):
        marks.setdefault("function starts", time.perf_counter())
        for reply, stats in stream_reply(*args, **kwargs):
            if reply:
                marks.setdefault("app yields it", time.perf_counter())
            yield reply, stats

    backend.stream, ui.stream_reply = timed_stream, timed_stream_reply


def inputs(url: str, run: int, max_new_tokens: int) -> list:
    """Greedy, its own system prompt per run (no prompt cache reused), the app's defaults for the rest."""
    return chat_inputs(chat_parameters(url), message=PROMPT, system_prompt=f"Session {run}.", temperature=0.0,
                       top_p=0.9, max_new_tokens=max_new_tokens)


def over_http(url: str, run: int, max_new_tokens: int) -> float:
    data = inputs(url, run, max_new_tokens)
    start = time.perf_counter()
    for outputs in stream_over_http(url, data):
        if outputs[0]:
            return start
    raise RuntimeError("no text arrived")


def over_gradio_client(url: str, run: int, max_new_tokens: int) -> float:
    from gradio_client import Client

    client = Client(url, verbose=False)  # a new session per run, as bench_app does: no history carried over
    data = inputs(url, run, max_new_tokens)
    start = time.perf_counter()
    for reply, _ in client.submit(*data, api_name="/chat"):
        if reply:
            return start
    raise RuntimeError("no text arrived")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    settings = load_settings({**os.environ, "CHATBOT_BACKEND": "llama_cpp", "CHATBOT_THREADS": str(args.threads)})
    backend = load_backend(settings)
    marks: dict[str, float] = {}
    instrument(backend, marks)
    demo = ui.build_app(settings, backend)
    demo.queue(max_size=64).launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    url = demo.local_url
    try:
        for name, ask in (("HTTP /gradio_api/call/chat", over_http), ("gradio_client", over_gradio_client)):
            rows = []
            for run in range(-1, args.runs):  # run -1 warms up
                marks.clear()
                # The client returns at its first text, and the generator may still be running: wait for it.
                start = ask(url, run, args.max_new_tokens)
                seen = time.perf_counter()
                if run >= 0:
                    rows.append({**{k: (marks[k] - start) * 1000 for k in STAGES[:-1]},
                                 "client sees it": (seen - start) * 1000})
                time.sleep(0.5)
            med = {k: statistics.median(r[k] for r in rows) for k in STAGES}
            backend_ms = med["backend first text"] - med["function starts"]
            print(f"{name}: " + " · ".join(f"{k} {med[k]:.0f} ms" for k in STAGES))
            print(f"  backend (prompt processing) {backend_ms:.0f} ms; everything else "
                  f"{med['client sees it'] - backend_ms:.0f} ms: before the function {med['function starts']:.0f}, "
                  f"app to Gradio {med['app yields it'] - med['backend first text']:.0f}, "
                  f"Gradio to client {med['client sees it'] - med['app yields it']:.0f}")
    finally:
        demo.close()


if __name__ == "__main__":
    main()
