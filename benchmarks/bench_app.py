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
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.model_files import embedded_gguf_path  # noqa: E402
from chatbot.settings import load_settings  # noqa: E402
from chatbot.timing import ReplyClock, decode_rate  # noqa: E402
from tools.ports import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a detailed essay about the history of computers, from the abacus to smartphones."


def system_prompt(run: int | str) -> str:
    return f"Session {run}. You are a helpful assistant."


def load_raw(threads: int | None):
    from llama_cpp import Llama

    from chatbot.backends.llama_cpp import extra_buffers

    settings = load_settings({**os.environ, **({"CHATBOT_THREADS": str(threads)} if threads else {})})
    # Same construction as the backend, including the extra-buffer setting (AMX crashes on some VMs).
    with extra_buffers(settings.llama_repack):
        return Llama(model_path=str(embedded_gguf_path()), n_ctx=settings.n_ctx, n_threads=settings.threads,
                     n_threads_batch=settings.threads, verbose=False)


def raw_run(llm, run: int, max_new_tokens: int) -> dict:
    messages = [{"role": "system", "content": system_prompt(run)}, {"role": "user", "content": PROMPT}]
    clock, text = ReplyClock(), ""
    for chunk in llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_new_tokens,
                                            temperature=0.0):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            clock.add(piece)
            text += piece
    return dict(ttft=clock.ttft, tps=clock.decode_tps, tokens=clock.tokens, text=text)


def raw_worker(threads: int | None, max_new_tokens: int) -> None:
    """--raw-worker: one process holding a raw Llama, like app.py holds its backend; a run index per stdin line,
    one JSON result per stdout line. Both sides in their own process keep the comparison symmetric."""
    llm = load_raw(threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(raw_run(llm, int(line), max_new_tokens)), flush=True)


def start_raw(threads: int | None, max_new_tokens: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--raw-worker", "--max-new-tokens", str(max_new_tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    worker = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    json.loads(worker.stdout.readline())
    return worker


def ask_raw(worker: subprocess.Popen, run: int) -> dict:
    worker.stdin.write(f"{run}\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def start_app(threads: int | None, max_new_tokens: int):
    """python app.py in its own process, as on a Space; returns (process, url) once it answers."""
    from gradio_client import Client

    port = free_port()
    env = {**os.environ, "CHATBOT_BACKEND": "llama_cpp", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "CHATBOT_MAX_NEW_TOKENS": str(max_new_tokens)}
    if threads:
        env["CHATBOT_THREADS"] = str(threads)
    env.pop("CHATBOT_MODEL", None)
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            Client(url, verbose=False)
            return server, url
        except Exception:
            if server.poll() is not None:
                sys.exit(f"app.py exited: {server.stderr.read()}")
            if time.time() > deadline:
                server.terminate()
                sys.exit("app.py did not start within 180 s")
            time.sleep(0.5)


def app_run(url: str, run: int, max_new_tokens: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)  # a new session per run: no chat history carried over
    start = time.perf_counter()
    job = client.submit(PROMPT, system_prompt(run), 0.0, 0.9, max_new_tokens, api_name="/chat")
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


def app_http_run(url: str, run: int, max_new_tokens: int) -> dict:
    """The same request through Gradio's REST API: POST the inputs, then read the event stream.

    Its own system prompt, so llama.cpp cannot reuse the gradio_client run's prompt cache; the token count
    comes from the app's stats line, since this reply may differ from raw's."""
    import httpx

    start = time.perf_counter()
    first = last = None
    text = stats = ""
    with httpx.Client(timeout=120) as http:
        event = http.post(f"{url}gradio_api/call/chat",
                          json={"data": [PROMPT, system_prompt(f"{run}-http"), 0.0, 0.9, max_new_tokens]}
                          ).json()["event_id"]
        with http.stream("GET", f"{url}gradio_api/call/chat/{event}") as events:
            for line in events.iter_lines():
                if not line.startswith("data:") or line[5:].strip() in ("", "null"):
                    continue
                data = json.loads(line[5:])  # [reply, (ChatInterface's hidden state), stats line]
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
    server, url = start_app(args.threads, args.max_new_tokens)
    worker = None
    try:
        worker = start_raw(args.threads, args.max_new_tokens)
        raw, app, http = [], [], []
        for run in range(-1, args.runs):  # run -1 warms both up (page cache, allocations), not reported
            r = ask_raw(worker, run)
            a, h = app_run(url, run, args.max_new_tokens), app_http_run(url, run, args.max_new_tokens)
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
        server.terminate()
        server.wait(30)

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
