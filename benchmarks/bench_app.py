"""Time one prompt through raw llama-cpp-python and through the whole app (python app.py, gradio_client,
streaming) on the embedded model; print TTFT and decode tokens/s for both, their ratio, and the
transformers backend on the same GGUF for comparison.

    python benchmarks/bench_app.py [--runs 3] [--max-new-tokens 256] [--threads N] [--no-transformers]

TTFT and decode tokens/s as chatbot.timing defines them (tokens after the first over first → last text).
The app runs in its own process, as on a Space, and so does raw llama-cpp-python (a worker process of
this script); the client here stands in for the browser, and raw and app runs alternate. Each run
starts with a different system prompt, so llama.cpp cannot reuse the previous run's prompt cache.
Targets: app ≥ 0.95 × raw tokens/s, app TTFT ≤ raw TTFT + 50 ms.
gradio_client (2.7) looks for new server messages every 50 ms when it has none, so the app's TTFT seen
here carries up to 50 ms of client-side polling that a browser does not add; the per-run "server-side"
figures are the app's own stats line (backend decode speed and time to first token inside the app).
The same app is also timed through Gradio's plain HTTP streaming API (POST /gradio_api/call/chat, then
its server-sent events), as a curl or browser-like client sees it, to tell server overhead from client overhead.
On a shared machine use --threads 1: llama.cpp's threads spin at barriers and collapse when oversubscribed.
Both sides get the same settings (this shell's CHATBOT_* variables are not used, but CHATBOT_LLAMA_REPACK); the
app's inputs are built from its own API description (benchmarks/chat_app.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from benchmarks.chat_app import chat_inputs, chat_parameters, running_app, stream_over_http
from chatbot.model_files import embedded_gguf_path
from chatbot.settings import load_settings
from chatbot.timing import ReplyClock, decode_rate
from training.paths import REPO_ROOT

PROMPT = "Write a detailed essay about the history of computers, from the abacus to smartphones."


def system_prompt(run: int | str) -> str:
    return f"Session {run}. You are a helpful assistant."


def app_settings(threads: int | None, max_new_tokens: int) -> dict[str, str]:
    """The CHATBOT_* settings of both sides: the embedded model through llama.cpp."""
    return {"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_MAX_NEW_TOKENS": str(max_new_tokens),
            **({"CHATBOT_THREADS": str(threads)} if threads else {}),
            **{k: v for k, v in os.environ.items() if k == "CHATBOT_LLAMA_REPACK"}}


def load_raw(threads: int | None, max_new_tokens: int):
    from llama_cpp import Llama

    from chatbot.backends.llama_cpp import extra_buffers

    settings = load_settings(app_settings(threads, max_new_tokens))
    # Same construction as the backend, including the extra-buffer setting (AMX crashes on some VMs).
    with extra_buffers(settings.llama_repack):
        return Llama(model_path=str(embedded_gguf_path()), n_ctx=settings.n_ctx, n_threads=settings.threads,
                     n_threads_batch=settings.threads, verbose=False), settings


def raw_run(llm, settings, run: int, max_new_tokens: int) -> dict:
    """Greedy, with the app's default min-p and repetition penalty (the app run leaves those to its sliders)."""
    messages = [{"role": "system", "content": system_prompt(run)}, {"role": "user", "content": PROMPT}]
    clock, text = ReplyClock(), ""
    for chunk in llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_new_tokens,
                                            temperature=0.0, top_p=0.9, min_p=settings.min_p,
                                            repeat_penalty=settings.repeat_penalty):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            clock.add(piece)
            text += piece
    return dict(ttft=clock.ttft, tps=clock.decode_tps, tokens=clock.tokens, text=text)


def raw_worker(threads: int | None, max_new_tokens: int) -> None:
    """--raw-worker: one process holding a raw Llama, like app.py holds its backend; a run index per stdin line,
    one JSON result per stdout line. Both sides in their own process keep the comparison symmetric."""
    llm, settings = load_raw(threads, max_new_tokens)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(raw_run(llm, settings, int(line), max_new_tokens)), flush=True)


def start_raw(threads: int | None, max_new_tokens: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--raw-worker", "--max-new-tokens", str(max_new_tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    worker = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    json.loads(worker.stdout.readline())
    return worker


def ask_raw(worker: subprocess.Popen, run: int) -> dict:
    worker.stdin.write(f"{run}\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def app_inputs(parameters: list[dict], system: str, max_new_tokens: int) -> list:
    """The /chat inputs of one run: greedy, the app's defaults for everything not named here."""
    return chat_inputs(parameters, message=PROMPT, system_prompt=system, temperature=0.0, top_p=0.9,
                       max_new_tokens=max_new_tokens)


def app_run(url: str, parameters: list[dict], run: int, max_new_tokens: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)  # a new session per run: no chat history carried over
    inputs = app_inputs(parameters, system_prompt(run), max_new_tokens)
    start = time.perf_counter()
    job = client.submit(*inputs, api_name="/chat")
    first = last = None
    text = ""
    stats = ""
    for reply, stats in job:
        if reply and reply != text:
            now = time.perf_counter()
            first = first or now
            last = now
            text = reply
    return dict(ttft=first - start, first=first, last=last, text=text, stats=stats)


def app_http_run(url: str, parameters: list[dict], run: int, max_new_tokens: int) -> dict:
    """The same request through Gradio's REST API: POST the inputs, then read the event stream.

    Its own system prompt, so llama.cpp cannot reuse the gradio_client run's prompt cache; the token count
    comes from the app's stats line, since this reply may differ from raw's."""
    inputs = app_inputs(parameters, system_prompt(f"{run}-http"), max_new_tokens)
    first = last = None
    text = stats = ""
    start = time.perf_counter()
    for data in stream_over_http(url, inputs):  # [reply, (ChatInterface's hidden state), stats line]
        reply, stats = data[0], data[-1]
        if reply and reply != text:
            now = time.perf_counter()
            first = first or now
            last = now
            text = reply
    tokens = int(stats.split(" tokens", 1)[0])
    return dict(ttft=first - start, tokens=tokens, tps=decode_rate(tokens - 1, last - first), stats=stats)


def transformers_backend(args) -> list[dict]:
    from chatbot.backends import GenerationParams, load_backend

    env = {"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(embedded_gguf_path())}
    if args.threads:
        env["CHATBOT_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    backend = load_backend(load_settings(env))
    print(f"(transformers backend: GGUF dequantised to fp32, loaded in {time.perf_counter() - t0:.0f} s)")
    results = []
    for run in range(-1, max(1, args.runs - 1)):
        messages = [{"role": "system", "content": system_prompt(run)}, {"role": "user", "content": PROMPT}]
        clock = ReplyClock()
        for chunk in backend.stream(messages, GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0)):
            clock.add(chunk.text, chunk.tokens)  # the streamer yields words: count tokens, not chunks
        if run >= 0:
            results.append(dict(ttft=clock.ttft, tps=clock.decode_tps, tokens=clock.tokens))
            print(f"transformers run {run}: TTFT {clock.ttft:.3f} s, {clock.decode_tps:.1f} tokens/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: CHATBOT_THREADS / CPU_CORES / all")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker:
        return raw_worker(args.threads, args.max_new_tokens)

    # Raw and app runs alternate, so both see the same machine load (a shared CI box drifts a lot).
    worker = None
    with running_app(app_settings(args.threads, args.max_new_tokens)) as served:
        url = served.url
        try:
            parameters = chat_parameters(url)
            worker = start_raw(args.threads, args.max_new_tokens)
            raw, app, http = [], [], []
            for run in range(-1, args.runs):  # run -1 warms both up (page cache, allocations), not reported
                r = ask_raw(worker, run)
                a = app_run(url, parameters, run, args.max_new_tokens)
                h = app_http_run(url, parameters, run, args.max_new_tokens)
                # Greedy decoding: the app returns the very text raw produced, i.e. the same number of tokens.
                a["tokens"] = r["tokens"]
                a["tps"] = decode_rate(r["tokens"] - 1, a["last"] - a["first"])
                if a["text"] != r["text"]:
                    print("warning: the app's reply differs from raw llama-cpp-python's for the same prompt")
                if run >= 0:
                    raw.append(r)
                    app.append(a)
                    http.append(h)
                    print(f"run {run}: raw TTFT {r['ttft']:.3f} s {r['tps']:.1f} tok/s | app TTFT {a['ttft']:.3f} s "
                          f"{a['tps']:.1f} tok/s (server-side: {a['stats']}) | app over HTTP TTFT {h['ttft']:.3f} s "
                          f"{h['tps']:.1f} tok/s", flush=True)
        finally:
            if worker is not None:
                worker.stdin.close()
                worker.wait(30)

    def median(rows, key):
        return statistics.median(row[key] for row in rows)

    raw_ttft, raw_tps, app_ttft, app_tps = median(raw, "ttft"), median(raw, "tps"), median(app, "ttft"), \
        median(app, "tps")
    threads = args.threads or load_settings().threads
    print(f"\nmodel {embedded_gguf_path().name} · {threads} threads · {args.max_new_tokens} max new tokens · "
          f"temperature 0 · median of {args.runs} runs")
    print(f"{'path':<34}{'TTFT s':>9}{'decode tok/s':>15}{'tokens':>8}")
    print(f"{'raw llama-cpp-python':<34}{raw_ttft:>9.3f}{raw_tps:>15.1f}{median(raw, 'tokens'):>8.0f}")
    print(f"{'app (app.py + gradio_client)':<34}{app_ttft:>9.3f}{app_tps:>15.1f}{median(app, 'tokens'):>8.0f}")
    print(f"{'app (HTTP /gradio_api/call/chat)':<34}{median(http, 'ttft'):>9.3f}{median(http, 'tps'):>15.1f}"
          f"{median(http, 'tokens'):>8.0f}")
    for label, ttft, tps in (("app / raw", app_ttft, app_tps),
                             ("app over HTTP / raw", median(http, "ttft"), median(http, "tps"))):
        ratio, extra = tps / raw_tps, ttft - raw_ttft
        print(f"{label}: {ratio:.3f}× tokens/s (target ≥ 0.95: {'met' if ratio >= 0.95 else 'NOT met'}), "
              f"TTFT {extra * 1000:+.0f} ms (target ≤ +50 ms: {'met' if extra <= 0.05 else 'NOT met'})")
    if not args.no_transformers:
        tf = transformers_backend(args)
        print(f"{'transformers backend (same GGUF)':<34}{median(tf, 'ttft'):>9.3f}{median(tf, 'tps'):>15.1f}"
              f"{median(tf, 'tokens'):>8.0f}   ({median(tf, 'tps') / raw_tps:.2f}× raw llama.cpp tokens/s)")


if __name__ == "__main__":
    main()
