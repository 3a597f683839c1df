"""Long conversations with several visitors, and whether replies loop: two tables, measured side by side.

    python benchmarks/bench_turns.py [--visitors 4] [--turns 10] [--reply-tokens 64] [--threads 2]
                                     [--app-visitors N] [--loop-prompts 16] [--loop-tokens 256] [--penalties 1.0,1.1,1.2]
                                     [--tables turns,loops,transformers]

Table 1: visitors take turns (v1 t1, v2 t1, ..., v1 t2, ...), each holding a 10-turn conversation with user
messages of everyday lengths. Every request goes to two llama_cpp backends on the embedded model, prompt cache on
(CHATBOT_CACHE_MB) and off, with the same messages (greedy; the conversation continues with the cached backend's
reply, and the count of identical replies is printed), and, with
--app-visitors, to two running `python app.py` (cache on / off) through gradio_client. TTFT per turn, median over
visitors, and turn 10 over turn 1 per visitor.

Table 2: every prompt of an everyday set answered at the old defaults (temperature 0.2, top-p 0.9, no repetition
penalty) and the new ones. An answer loops when the word 8-grams that occur again cover >= 10% of its words;
stop rate = answers that ended by themselves before --loop-tokens.

--tables transformers: one conversation through the transformers backend, each turn with and without the key/value
cache it keeps of the last conversation.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import ExitStack

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

from benchmarks.chat_app import chat_inputs, chat_parameters, running_app
from chatbot.backends import GenerationParams, load_backend
from chatbot.settings import DEFAULT_SYSTEM_PROMPT, load_settings
from chatbot.timing import ReplyClock

# Ten user turns of everyday lengths (about 10 to 90 words), a conversation that builds on itself.
TURNS = [
    "Hi! I'm planning a small vegetable garden on my balcony. What should I think about first?",
    "It gets about five hours of direct sun in the afternoon, and the balcony is on the fourth floor, so it can be "
    "windy. I have space for maybe six medium pots and one long planter box along the railing.",
    "Which vegetables would you pick for that? I like tomatoes, salad and herbs, but I don't know which of them "
    "cope with wind and only half a day of sun.",
    "What kind of soil should I buy?",
    "How often should I water in summer? I travel for work some weeks, usually three or four days at a time, and I "
    "worry that the pots will dry out while I'm gone. Are there simple tricks that don't need electricity, like "
    "self-watering pots or bottles? My neighbour could help once a week at most.",
    "Thanks. Do tomatoes need support, and what is the easiest way to give it in a pot?",
    "Something is eating holes in my lettuce leaves. I haven't seen any insects during the day, but there are "
    "little black dots on the leaves and on the soil. What could it be, and how do I get rid of it without "
    "spraying chemicals? I'd like to keep eating the lettuce.",
    "Can I grow anything in winter on the same balcony?",
    "Last question about the herbs: basil keeps flowering and getting woody. I've been picking single leaves from "
    "the bottom when I cook. Am I doing it wrong? How should I harvest basil so that it stays bushy for longer, "
    "and should I cut off the flowers?",
    "Great, can you summarise the whole plan for me in a short checklist I can stick on the fridge?",
]

# Everyday prompts for the loop table: questions, writing, lists, advice, explanations.
LOOP_PROMPTS = [
    "Write a short poem about autumn.",
    "Give me five ideas for a rainy Sunday afternoon.",
    "Explain how a refrigerator works.",
    "What are the benefits of drinking water?",
    "Write a short story about a cat who wants to fly.",
    "How do I make a good cup of coffee at home?",
    "List some tips for a job interview.",
    "What is photosynthesis?",
    "Describe your ideal vacation.",
    "How can I improve my sleep?",
    "Write a thank-you note to a teacher.",
    "What should I pack for a weekend camping trip?",
    "Explain the difference between weather and climate.",
    "Give me a simple recipe for pancakes.",
    "Why is the sky blue?",
    "How do I start learning to play the guitar?",
    "Write a product description for a reusable water bottle.",
    "What are some good habits for staying healthy?",
    "Tell me about the history of the bicycle.",
    "How do I write a good email to my landlord about a broken heater?",
]


def loops(text: str, n: int = 8, threshold: float = 0.10) -> bool:
    """True when word n-grams that occur again (every occurrence after the first) cover >= threshold of the words."""
    words = text.split()
    if len(words) < 2 * n:
        return False
    seen: set[tuple[str, ...]] = set()
    covered: set[int] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(w.lower() for w in words[i:i + n])
        if gram in seen:
            covered.update(range(i, i + n))
        seen.add(gram)
    return len(covered) / len(words) >= threshold


def backend_for(threads: int, cache_mb: int, n_ctx: int):
    env = {"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_THREADS": str(threads), "CHATBOT_CACHE_MB": str(cache_mb),
           "CHATBOT_N_CTX": str(n_ctx), "CHATBOT_PARALLEL": "1",  # the serial backend's cache
           **{k: v for k, v in os.environ.items() if k == "CHATBOT_LLAMA_REPACK"}}
    return load_backend(load_settings(env))


def ask(backend, messages: list[dict], params: GenerationParams) -> tuple[float, str, str | None]:
    """(TTFT s, reply, finish reason) through the backend's stream."""
    clock, text, finish = ReplyClock(), "", None
    for chunk in backend.stream(messages, params):
        clock.add(chunk.text, chunk.tokens)
        text += chunk.text
        finish = chunk.finish_reason or finish
    return clock.ttft or 0.0, text, finish


def app_settings(threads: int, cache_mb: int, n_ctx: int, reply_tokens: int) -> dict[str, str]:
    return {"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_THREADS": str(threads), "CHATBOT_CACHE_MB": str(cache_mb),
            "CHATBOT_N_CTX": str(n_ctx), "CHATBOT_PARALLEL": "1",  # the serial backend's cache
            "CHATBOT_MAX_NEW_TOKENS": str(reply_tokens), "CHATBOT_TEMPERATURE": "0"}


def ask_app(client, parameters: list[dict], message: str, reply_tokens: int) -> float:
    """TTFT through the app: submit → first non-empty reply text seen by the client (the app keeps the history)."""
    inputs = chat_inputs(parameters, message=message, system_prompt=DEFAULT_SYSTEM_PROMPT, temperature=0.0,
                         top_p=0.9, max_new_tokens=reply_tokens)
    start, first = time.perf_counter(), None
    for reply, _stats in client.submit(*inputs, api_name="/chat"):
        if reply and first is None:
            first = time.perf_counter()
    return (first or time.perf_counter()) - start


def turns_table(args) -> None:
    greedy = GenerationParams(max_new_tokens=args.reply_tokens, temperature=0.0,
                              repeat_penalty=load_settings({}).repeat_penalty)  # what the app uses
    cached, plain = backend_for(args.threads, args.cache_mb, args.n_ctx), backend_for(args.threads, 0, args.n_ctx)
    clients, parameters = {}, []
    with ExitStack() as apps:  # the two apps (with --app-visitors), stopped when the turns are done
        if args.app_visitors:
            from gradio_client import Client

            urls = [apps.enter_context(running_app(app_settings(args.threads, cache_mb, args.n_ctx,
                                                                  args.reply_tokens))).url
                    for cache_mb in (args.cache_mb, 0)]
            parameters = [chat_parameters(url) for url in urls]
            clients = {(v, i): Client(url, verbose=False) for v in range(args.app_visitors)
                       for i, url in enumerate(urls)}
        histories = [[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] for _ in range(args.visitors)]
        ttft: dict[str, dict[int, list[float]]] = {k: {} for k in ("backend, cache on", "backend, cache off",
                                                                 "app, cache on", "app, cache off")}
        prompt_tokens: dict[int, list[int]] = {}
        mismatches = 0
        for turn in range(args.turns):
            for v in range(args.visitors):
                message = f"(visitor {v + 1}) " + TURNS[turn % len(TURNS)]
                messages = histories[v] + [{"role": "user", "content": message}]
                prompt_tokens.setdefault(v, []).append(cached.count_tokens(messages))
                # Alternate which goes first, so neither always meets the machine just after the other's work.
                if (turn + v) % 2:
                    t_off, reply_off, _ = ask(plain, messages, greedy)
                    t_on, reply, _ = ask(cached, messages, greedy)
                else:
                    t_on, reply, _ = ask(cached, messages, greedy)
                    t_off, reply_off, _ = ask(plain, messages, greedy)
                mismatches += reply != reply_off
                ttft["backend, cache on"].setdefault(v, []).append(t_on)
                ttft["backend, cache off"].setdefault(v, []).append(t_off)
                if v < args.app_visitors:
                    for i, key in enumerate(("app, cache on", "app, cache off")):
                        ttft[key].setdefault(v, []).append(ask_app(clients[v, i], parameters[i], message,
                                                                   args.reply_tokens))
                histories[v] = messages + [{"role": "assistant", "content": reply}]
                print(f"turn {turn + 1} visitor {v + 1}: prompt {prompt_tokens[v][-1]} tokens, TTFT cache on "
                      f"{t_on:.2f} s, off {t_off:.2f} s", flush=True)

    paths = [k for k, rows in ttft.items() if rows]
    print(f"\nTable 1: TTFT per turn (s), median over visitors; {args.visitors} visitors interleaved "
          f"({args.app_visitors} of them also through the app), {args.reply_tokens}-token replies, greedy, "
          f"{args.threads} threads, embedded SmolLM2-135M Q4_1, CHATBOT_CACHE_MB={args.cache_mb}")
    print("| turn | prompt tokens | " + " | ".join(paths) + " | off / on (backend) |")
    print("|---" * (len(paths) + 3) + "|")
    for t in range(args.turns):
        med = {k: statistics.median(rows[v][t] for v in rows) for k, rows in ttft.items() if rows}
        tokens = statistics.median(prompt_tokens[v][t] for v in prompt_tokens)
        ratio = med["backend, cache off"] / med["backend, cache on"]
        print(f"| {t + 1} | {tokens:.0f} | " + " | ".join(f"{med[k]:.2f}" for k in paths) + f" | {ratio:.1f}× |")
    for k in paths:
        rows = ttft[k]
        worst = max(rows[v][-1] / rows[v][0] for v in rows)
        print(f"{k}: TTFT turn {args.turns} / turn 1, worst visitor: {worst:.1f}×"
              + (f" (target <= 2×: {'met' if worst <= 2 else 'NOT met'})" if "cache on" in k else ""))
    print(f"replies identical with the cache on and off: {args.visitors * args.turns - mismatches} of "
          f"{args.visitors * args.turns}")
    if cached.cache is not None:
        print(f"cache: {len(cached.cache.cache_state)} states, {cached.cache.cache_size / 2**20:.1f} MiB "
              f"(bound {args.cache_mb} MiB)")


def loop_table(args) -> None:
    backend = backend_for(args.threads, 0, args.n_ctx)
    prompts = LOOP_PROMPTS[:args.loop_prompts]
    default = load_settings({}).repeat_penalty
    configs = [("old defaults (no repetition penalty)", 1.0)] + [
        (f"repetition penalty {p:g}" + (" (the default)" if p == default else ""), p) for p in args.penalties if p != 1.0]
    rows = {}
    for label, penalty in configs:
        looped = stopped = words = 0
        for i, prompt in enumerate(prompts):
            params = GenerationParams(max_new_tokens=args.loop_tokens, temperature=0.2, top_p=0.9, min_p=0.05,
                                      repeat_penalty=penalty, seed=i)
            _, text, finish = ask(backend, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                            {"role": "user", "content": prompt}], params)
            looped += loops(text)
            stopped += finish == "stop"
            words += len(text.split())
        rows[label] = (looped / len(prompts), stopped / len(prompts), words / len(prompts))
        print(f"{label}: {looped}/{len(prompts)} loop, {stopped}/{len(prompts)} stop", flush=True)
    print(f"\nTable 2: {len(prompts)} everyday prompts, temperature 0.2, top-p 0.9, min-p 0.05, seed = prompt index, "
          f"up to {args.loop_tokens} new tokens")
    print("| sampling | answers that loop | stop rate | mean words |")
    print("|---|---|---|---|")
    for label, (loop_share, stop_rate, mean_words) in rows.items():
        print(f"| {label} | {loop_share:.0%} | {stop_rate:.0%} | {mean_words:.0f} |")


def transformers_table(args) -> None:
    """One visitor through the transformers backend (the embedded GGUF dequantised to fp32): each turn asked twice,
    with the kept key/value cache of the previous turn and without it (the backend keeps the last conversation only)."""
    from chatbot.model_files import embedded_gguf_path

    backend = load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(embedded_gguf_path()),
                                          "CHATBOT_THREADS": str(args.threads)}))
    params = GenerationParams(max_new_tokens=args.reply_tokens, temperature=0.0,
                              repeat_penalty=load_settings({}).repeat_penalty)
    history = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    print(f"\nTransformers backend, one conversation, {args.reply_tokens}-token replies, greedy, {args.threads} threads")
    print("| turn | prompt tokens | TTFT, last conversation's cache kept | TTFT without | same reply |")
    print("|---|---|---|---|---|")
    for turn in range(args.turns):
        history.append({"role": "user", "content": TURNS[turn % len(TURNS)]})
        kept, backend.kept = backend.kept, None
        t_off, reply_off, _ = ask(backend, history, params)
        backend.kept = kept
        t_on, reply, _ = ask(backend, history, params)
        print(f"| {turn + 1} | {backend.count_tokens(history)} | {t_on:.2f} | {t_off:.2f} | "
              f"{'yes' if reply == reply_off else 'no'} |", flush=True)
        history.append({"role": "assistant", "content": reply})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=int, default=4)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--reply-tokens", type=int, default=64, help="max new tokens per reply in table 1")
    parser.add_argument("--app-visitors", type=int, default=2, help="how many visitors also go through the app")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--cache-mb", type=int, default=load_settings({}).cache_mb)
    parser.add_argument("--loop-prompts", type=int, default=len(LOOP_PROMPTS))
    parser.add_argument("--loop-tokens", type=int, default=256)
    parser.add_argument("--penalties", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 1.1, 1.2])
    parser.add_argument("--tables", default="turns,loops",
                        help="comma-separated: turns, loops, transformers (the transformers backend's kept cache)")
    args = parser.parse_args()
    args.app_visitors = min(args.app_visitors, args.visitors)
    tables = {"turns": turns_table, "loops": loop_table, "transformers": transformers_table}
    for name in args.tables.split(","):
        tables[name.strip()](args)


if __name__ == "__main__":
    main()
