"""Several visitors at the same moment through the running app: the serial llama_cpp path (CHATBOT_PARALLEL=1) and
the batched one (CHATBOT_PARALLEL=P) side by side in one run.

    python benchmarks/bench_visitors.py [--visitors 1,2,4,8] [--reply-tokens 200] [--threads 2] [--parallel 4]
                                        [--rounds 3] [--shape llama-3.2-1b | --model PATH.gguf] [--n-ctx 4096]

Two `python app.py` processes (one per path, only one busy at a time); for each visitor count, that many clients
send a different message at the same moment (greedy, new sessions, so no prompt cache helps) over Gradio's HTTP
API, and each records its time to first text and its last text; the token count is the app's own stats line.
Per path and count: the visitors' TTFTs (sorted), the slowest, aggregate tokens/s (all tokens over the time from the
common start to the last text anyone got) and per-visitor decode tokens/s (median; tokens after the first over first
→ last text), each the median over --rounds rounds. Serial and batched alternate which goes first. The targets (issue 21), with 4 visitors on the batched
path: slowest TTFT <= 3 × a lone visitor's + 0.5 s; aggregate >= 1.4 × one visitor's; and a lone visitor keeps
>= 0.95 × the serial path's tokens/s.

--shape llama-3.2-1b serves a random-weight model of that shape (SmolLM2's tokenizer and template, q4_k_m; built
once into the temp folder, ~1 GB, a few minutes): replies are noise, the timings are the 1B model's.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from benchmarks.chat_app import chat_inputs, chat_parameters, running_app, stream_over_http
from benchmarks.medians import median_per_figure
from chatbot.timing import decode_rate
from training.trainer.peak_memory import rss_mib

TOPICS = ["the history of computers", "how bridges are built", "the water cycle", "the Roman Empire",
          "how vaccines work", "the life of bees", "the invention of printing", "how airplanes fly"]
PATHS = ("serial", "batched")


def visitor_message(i: int) -> str:
    return f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}, with an introduction and three sections."


def one_visitor(url: str, inputs: list, start: threading.Barrier, out: dict) -> None:
    """Wait for the others, send, and record when the first and the last text arrived and the app's token count."""
    start.wait()
    sent = time.perf_counter()
    first = last = None
    reply, stats = "", ""
    for update in stream_over_http(url, inputs):
        if update[0] and update[0] != reply:
            last = time.perf_counter()
            first = first or last
            reply = update[0]
        stats = update[-1] or stats
    tokens = int(stats.split(" tokens", 1)[0]) if " tokens" in stats else 0
    out.update(sent=sent, first=first or sent, last=last or sent, tokens=tokens)


def round_of(url: str, parameters: list[dict], visitors: int, reply_tokens: int) -> dict:
    """`visitors` clients at the same moment; their TTFTs (sorted), the slowest, aggregate and per-visitor tokens/s."""
    barrier = threading.Barrier(visitors)
    results = [{} for _ in range(visitors)]
    threads = [threading.Thread(target=one_visitor, args=(url, chat_inputs(
        parameters, message=visitor_message(i), temperature=0.0, max_new_tokens=reply_tokens), barrier, results[i]))
        for i in range(visitors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["sent"] for r in results)
    ttfts = [r["first"] - r["sent"] for r in results]
    rates = [decode_rate(r["tokens"] - 1, r["last"] - r["first"]) or 0.0 for r in results]
    total = sum(r["tokens"] for r in results)
    return dict(ttfts=sorted(ttfts), slowest=max(ttfts), aggregate=total / (max(r["last"] for r in results) - start),
                per_visitor=statistics.median(rates), tokens=total)


def random_gguf(shape: str) -> Path:
    """A random-weight GGUF of a named shape (training/trainer/shapes.py) with SmolLM2's tokenizer, q4_k_m; made once."""
    folder = Path(tempfile.gettempdir()) / "chatbot-bench-visitors"
    gguf = folder / f"{shape}-q4_k_m.gguf"
    if gguf.is_file():
        return gguf
    from transformers import AutoTokenizer

    from chatbot.model_files import embedded_gguf_path
    from training.export.gguf import export_gguf
    from training.trainer.shapes import build_tiny_checkpoint

    print(f"building a random {shape} GGUF in {folder} (once)", flush=True)
    embedded = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(embedded.parent, gguf_file=embedded.name)
    with tempfile.TemporaryDirectory() as hf_dir:
        build_tiny_checkpoint(shape, tokenizer, hf_dir)
        export_gguf(hf_dir, folder, ["q4_k_m"], name=shape, progress=False)
    return gguf


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--reply-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4, help="CHATBOT_PARALLEL of the batched path")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per visitor count and path (medians reported)")
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--shape", default=None, help="serve a random-weight model of this shape, e.g. llama-3.2-1b")
    args = parser.parse_args(argv)
    model = str(random_gguf(args.shape)) if args.shape else args.model
    common = {"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_THREADS": str(args.threads), "CHATBOT_N_CTX": str(args.n_ctx),
              "CHATBOT_MAX_NEW_TOKENS": str(args.reply_tokens), **({"CHATBOT_MODEL": model} if model else {})}
    parallel = {"serial": 1, "batched": args.parallel}
    with ExitStack() as stack:
        apps = {path: stack.enter_context(running_app({**common, "CHATBOT_PARALLEL": str(parallel[path])}))
                for path in PATHS}
        parameters = {path: chat_parameters(app.url) for path, app in apps.items()}
        for path in PATHS:  # warm-up (page cache, first allocations): not reported
            round_of(apps[path].url, parameters[path], 1, 8)
        rounds: dict[tuple[str, int], list[dict]] = {}
        for k in range(len(args.visitors) * args.rounds):
            visitors = args.visitors[k // args.rounds]
            for path in (PATHS if k % 2 == 0 else PATHS[::-1]):
                row = round_of(apps[path].url, parameters[path], visitors, args.reply_tokens)
                rounds.setdefault((path, visitors), []).append(row)
                print(f"{path}, {visitors} visitors: TTFT " + ", ".join(f"{t:.2f}" for t in row["ttfts"])
                      + f" s; aggregate {row['aggregate']:.1f} tokens/s, per visitor {row['per_visitor']:.1f}",
                      flush=True)
        rows = {key: median_per_figure(found) for key, found in rounds.items()}  # k-th fastest TTFT with k-th
        peak = {path: rss_mib(app.proc.pid, "VmHWM") for path, app in apps.items()}

    if args.shape:
        name = f"random-weight {args.shape} (q4_k_m, SmolLM2's tokenizer)"
    else:
        name = Path(model).name if model else "embedded SmolLM2-135M Q4_1"
    print(f"\n{name}, {args.threads} threads, {args.reply_tokens}-token replies (greedy), serial = CHATBOT_PARALLEL=1, "
          f"batched = CHATBOT_PARALLEL={args.parallel}, CHATBOT_N_CTX={args.n_ctx}; medians of {args.rounds} rounds")
    print("| visitors | path | TTFT each, sorted (s) | slowest TTFT (s) | aggregate tokens/s | per-visitor tokens/s | "
          "tokens | aggregate / serial's |")
    print("|---|---|---|---|---|---|---|---|")
    for visitors in args.visitors:
        for path in PATHS:
            row = rows[path, visitors]
            ratio = row["aggregate"] / rows["serial", visitors]["aggregate"]
            print(f"| {visitors} | {path} | {' '.join(f'{t:.2f}' for t in row['ttfts'])} | {row['slowest']:.2f} | "
                  f"{row['aggregate']:.1f} | {row['per_visitor']:.1f} | {row['tokens']:.0f} | {ratio:.2f}× |")
    print("app peak RSS: " + ", ".join(f"{path} {mib:.0f} MiB" for path, mib in peak.items())
          + f" (the batched path holds KV for {args.parallel} × CHATBOT_N_CTX tokens)")
    lone = rows.get(("batched", 1))
    if lone:
        ratio = lone["per_visitor"] / rows["serial", 1]["per_visitor"]
        print(f"lone visitor, batched / serial tokens/s: {ratio:.2f}× (target >= 0.95: "
              f"{'met' if ratio >= 0.95 else 'NOT met'})")
    if lone and ("batched", 4) in rows:
        four = rows["batched", 4]
        bound = 3 * lone["slowest"] + 0.5
        gain = four["aggregate"] / lone["aggregate"]
        print(f"4 visitors, batched: slowest TTFT {four['slowest']:.2f} s (target <= 3 × {lone['slowest']:.2f} + 0.5 = "
              f"{bound:.2f}: {'met' if four['slowest'] <= bound else 'NOT met'}); aggregate {gain:.2f}× one "
              f"visitor's (target >= 1.4: {'met' if gain >= 1.4 else 'NOT met'})")
    return rows


if __name__ == "__main__":
    main()
