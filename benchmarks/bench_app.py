"""Time one prompt through raw llama-cpp-python and through the whole app (python app.py, gradio_client,
streaming) on the embedded model; print TTFT and decode tokens/s for both, their ratio, and the
transformers backend on the same GGUF for comparison.

    python benchmarks/bench_app.py [--runs 3] [--max-new-tokens 256] [--threads N] [--no-transformers]

TTFT: request sent → first text received. Decode tokens/s: (tokens - 1) / (last text - first text).
The app runs in its own process, as on a Space; the client here stands in for the browser. Each run
starts with a different system prompt, so llama.cpp cannot reuse the previous run's prompt cache.
Targets (issue 2): app ≥ 0.95 × raw tokens/s, app TTFT ≤ raw TTFT + 50 ms.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.models import embedded_gguf_path  # noqa: E402
from chatbot.settings import load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a detailed essay about the history of computers, from the abacus to smartphones."


def system_prompt(run: int) -> str:
    return f"Session {run}. You are a helpful assistant."


def raw_llama(args) -> list[dict]:
    from llama_cpp import Llama

    from chatbot.backends.llama_cpp import extra_buffers

    settings = load_settings({"CHATBOT_THREADS": str(args.threads)} if args.threads else os.environ)
    # Same construction as the backend, including the extra-buffer setting (AMX crashes on some VMs).
    with extra_buffers(settings.llama_repack):
        llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=settings.n_ctx, n_threads=settings.threads,
                    n_threads_batch=settings.threads, verbose=False)
    results = []
    for run in range(-1, args.runs):  # run -1 warms up (page cache, allocations) and is not reported
        messages = [{"role": "system", "content": system_prompt(run)}, {"role": "user", "content": PROMPT}]
        start = time.perf_counter()
        first = last = None
        text, tokens = "", 0
        for chunk in llm.create_chat_completion(messages=messages, stream=True, max_tokens=args.max_new_tokens,
                                                temperature=0.0):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                text += piece
                tokens += 1
        if run >= 0:
            results.append(dict(ttft=first - start, tps=(tokens - 1) / (last - first), tokens=tokens, text=text))
            print(f"raw run {run}: TTFT {first - start:.3f} s, {results[-1]['tps']:.1f} tokens/s", flush=True)
    del llm
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_app(args) -> list[dict]:
    from gradio_client import Client

    port = free_port()
    env = {**os.environ, "CHATBOT_BACKEND": "llama_cpp", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "CHATBOT_MAX_NEW_TOKENS": str(args.max_new_tokens)}
    if args.threads:
        env["CHATBOT_THREADS"] = str(args.threads)
    env.pop("CHATBOT_MODEL", None)
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                if server.poll() is not None:
                    sys.exit(f"app.py exited: {server.stderr.read()}")
                if time.time() > deadline:
                    sys.exit("app.py did not start within 180 s")
                time.sleep(0.5)
        results = []
        for run in range(-1, args.runs):
            start = time.perf_counter()
            job = client.submit(PROMPT, system_prompt(run), 0.0, 0.9, args.max_new_tokens, api_name="/chat")
            first = last = None
            text = ""
            for reply, _stats in job:
                if reply and reply != text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text = reply
            if run >= 0:
                results.append(dict(ttft=first - start, last=last, first=first, text=text))
                print(f"app run {run}: TTFT {first - start:.3f} s", flush=True)
            # A new session per run: no chat history carried into the next prompt.
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        return results
    finally:
        server.terminate()
        server.wait(30)


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
        start = time.perf_counter()
        first = last = None
        tokens = after_first = 0
        for chunk in backend.stream(messages, GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0)):
            tokens += chunk.tokens
            if first is not None:
                after_first += chunk.tokens  # the streamer yields words: count tokens, not chunks
            if chunk.text:
                now = time.perf_counter()
                first = first or now
                last = now
        if run >= 0:
            results.append(dict(ttft=first - start, tps=after_first / (last - first), tokens=tokens))
            print(f"transformers run {run}: TTFT {first - start:.3f} s, {results[-1]['tps']:.1f} tokens/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: CHATBOT_THREADS / CPU_CORES / all")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    raw = raw_llama(args)
    app = through_app(args)
    for r, a in zip(raw, app):
        # Greedy decoding: the app returns the very text raw produced, so it is the same number of tokens.
        a["tokens"] = r["tokens"]
        a["tps"] = (r["tokens"] - 1) / (a["last"] - a["first"])
        if a["text"] != r["text"]:
            print("warning: the app's reply differs from raw llama-cpp-python's for the same prompt")

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
    ratio, extra = app_tps / raw_tps, app_ttft - raw_ttft
    print(f"app / raw: {ratio:.3f}× tokens/s (target ≥ 0.95: {'met' if ratio >= 0.95 else 'NOT met'}), "
          f"TTFT {extra * 1000:+.0f} ms (target ≤ +50 ms: {'met' if extra <= 0.05 else 'NOT met'})")
    if not args.no_transformers:
        tf = transformers_backend(args)
        print(f"{'transformers backend (same GGUF)':<34}{median(tf, 'ttft'):>9.3f}{median(tf, 'tps'):>15.1f}"
              f"{median(tf, 'tokens'):>8.0f}   ({median(tf, 'tps') / raw_tps:.2f}× raw llama.cpp tokens/s)")


if __name__ == "__main__":
    main()
