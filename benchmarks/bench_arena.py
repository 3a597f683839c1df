"""What an Arena turn costs against a normal chat turn, side by side in one run, through the app's own code: the chat
function (chatbot.ui.make_respond) on the chat model, and a battle (chatbot.arena.Arena.fight) on the chat model and
CHATBOT_ARENA_MODEL's, both loaded once as app.py loads them.

    python benchmarks/bench_arena.py [--second PATH.gguf] [--reply-tokens 128] [--threads 2] [--parallel 4]
                                     [--rounds 3]

Greedy decoding (CHATBOT_TEMPERATURE=0), one prompt, new sessions. The second model is by default a copy of the
embedded SmolLM2-135M GGUF in a temp folder (a separate file, so nothing is shared but the code): the same size and
architecture as the CPU recipe's export, and the same replies, so an arena turn decodes exactly twice a normal turn's
tokens. Per turn: wall time to the last text, time to the first text (of each model), tokens, tokens/s (every token
over the wall time) and the process's CPU seconds (what the turn takes of the machine's cores). Three turns, each
round in a rotated order: `normal` (the chat model), `arena` (the app's battle: both models at once, each engine with
all CHATBOT_THREADS threads) and `arena, one after the other` (the same two replies, the second model starting when
the first is done: what a battle would cost without generating both at once); before them, in the same process,
`normal, before the arena model is loaded` (the app without an Arena: once a process runs two llama.cpp engines,
their OpenMP threads outnumber the cores and libgomp makes them wait passively instead of spinning). Medians of
--rounds rounds, after a warm-up; the resident memory with the chat model alone and with both loaded.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from benchmarks.medians import median_per_figure
from training.trainer.peak_memory import rss_mib

PROMPT = "Write a detailed essay about the history of computers, with an introduction and three sections."
ALONE = "normal, before the arena model is loaded"
TURNS = ("normal", "arena", "arena, one after the other")


class Counted:
    """A backend as the app sees it, counting the tokens it streams and when its first text came."""

    def __init__(self, backend):
        self.backend = backend
        self.tokens, self.first = 0, None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def stream(self, messages, params, cancel=None):
        for chunk in self.backend.stream(messages, params, cancel):
            if chunk.text and self.first is None:
                self.first = time.perf_counter()
            self.tokens += chunk.tokens
            yield chunk


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(run, sides: list[Counted]) -> dict:
    """Run one turn (`run` drains the app's generator); its wall time, first text of each side, tokens, CPU s."""
    for side in sides:
        side.tokens, side.first = 0, None
    cpu, start = cpu_seconds(), time.perf_counter()
    run()
    wall = time.perf_counter() - start
    tokens = sum(s.tokens for s in sides)
    return {"wall": wall, "first": [(s.first or start + wall) - start for s in sides], "tokens": tokens,
            "cpu": cpu_seconds() - cpu, "tps": tokens / wall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--second", default=None, help="the arena model's GGUF (default: a copy of the embedded one)")
    parser.add_argument("--reply-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="CHATBOT_THREADS (a CPU basic Space: 2)")
    parser.add_argument("--parallel", type=int, default=4, help="CHATBOT_PARALLEL")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from chatbot.arena import Arena
    from chatbot.backends import load_arena_backend, load_backend
    from chatbot.model_files import embedded_gguf_path
    from chatbot.settings import load_settings
    from chatbot.ui import make_respond

    with tempfile.TemporaryDirectory() as tmp:
        second = args.second
        if second is None:
            second = str(Path(tmp) / "second-copy.gguf")
            shutil.copyfile(embedded_gguf_path(), second)
        settings = load_settings({"CHATBOT_THREADS": str(args.threads), "CHATBOT_PARALLEL": str(args.parallel),
                                  "CHATBOT_N_CTX": str(args.n_ctx), "CHATBOT_MAX_NEW_TOKENS": str(args.reply_tokens),
                                  "CHATBOT_TEMPERATURE": "0", "CHATBOT_ARENA_MODEL": second})
        before = rss_mib()
        chat = Counted(load_backend(settings))
        alone = rss_mib()
        respond = {chat: make_respond(settings, chat)}

        def normal(*backends: Counted) -> None:
            for backend in backends:
                for _ in respond[backend](PROMPT, []):
                    pass

        def report(turn: str, row: dict) -> None:
            found[turn].append(row)
            print(f"{turn}: {row['wall']:.2f} s, {row['tokens']} tokens, CPU {row['cpu']:.2f} s", flush=True)

        found: dict[str, list[dict]] = {turn: [] for turn in (ALONE, *TURNS)}
        measure(lambda: normal(chat), [chat])  # warm-up (page cache, first allocations): not reported
        for _ in range(args.rounds):  # the app without an Arena: llama.cpp's threads as a one-model process has them
            report(ALONE, measure(lambda: normal(chat), [chat]))
        other = Counted(load_arena_backend(settings))
        both = rss_mib()
        respond[other] = make_respond(settings, other)
        arena = Arena(settings, chat, other)

        def battle() -> None:
            for _ in arena.fight(PROMPT, None):
                pass

        runs = {"normal": (lambda: normal(chat), [chat]), "arena": (battle, [chat, other]),
                "arena, one after the other": (lambda: normal(chat, other), [chat, other])}
        for r in range(args.rounds):
            for turn in TURNS[r % 3:] + TURNS[:r % 3]:
                report(turn, measure(*runs[turn]))
        for backend in (chat.backend, other.backend):
            backend.close()

    rows = {turn: median_per_figure(found[turn]) for turn in found}
    base = rows["normal"]
    shown = "a copy of the embedded SmolLM2-135M Q4_1" if args.second is None else Path(second).name
    print(f"\nembedded SmolLM2-135M Q4_1 against {shown}: {args.threads} threads, CHATBOT_PARALLEL={args.parallel}, "
          f"{args.reply_tokens}-token replies (greedy); medians of {args.rounds} rounds")
    print("| turn | wall (s) | first text, chat / arena model (s) | tokens | tokens/s | CPU (s) | wall / normal | "
          "CPU / normal |")
    print("|---|---|---|---|---|---|---|---|")
    for turn in found:
        row = rows[turn]
        print(f"| {turn} | {row['wall']:.2f} | {' / '.join(f'{t:.2f}' for t in row['first'])} | {row['tokens']:.0f} | "
              f"{row['tps']:.1f} | {row['cpu']:.2f} | {row['wall'] / base['wall']:.2f}× | "
              f"{row['cpu'] / max(1e-9, base['cpu']):.2f}× |")
    print(f"resident memory: {before:.0f} MiB before loading, {alone:.0f} MiB with the chat model, {both:.0f} MiB with "
          f"both (KV for {args.parallel} × {args.n_ctx} tokens each)")
    return rows


if __name__ == "__main__":
    main()
