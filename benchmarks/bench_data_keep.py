"""How much of a messy ShareGPT-style corpus becomes training data: strict rules against repair + windowing.

    python benchmarks/bench_data_keep.py                    # 2,000 conversations, max_length 1024
    python benchmarks/bench_data_keep.py --conversations 10000 --max-length 2048

The corpus is generated with a fixed seed in the shapes real ShareGPT dumps have (chunked conversations that open
with the assistant, role names beyond human/gpt, system turns mid-conversation, empty turns, a dangling last
question, two messages in a row, a few enormous conversations, a few tool turns and conversations with no
exchange at all). The figure is the share of conversations that contain at least one user -> assistant exchange
(judged here from the raw turns, not by the library) that yield at least one training example: normalised, split
into windows when longer than max_length, and tokenised by `training.chat_format.encode_conversation` with at
least one trained token, exactly the path `finetune.py` takes. "strict" is `repair: false` (the rules before
repair existed: such conversations are dropped whole, long ones cut at max_length; the role alias table applies to
both). Target: >= 95%. The seconds column is that tokenisation: a long conversation encoded whole costs one
template render per assistant turn over its whole length, a window only over the window.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

TARGET = 0.95

USER_NAMES = ["human"] * 8 + ["user", "prompter"]
ASSISTANT_NAMES = ["gpt"] * 8 + ["assistant", "chatgpt", "bing", "bard", "model"]
# Share of conversations with each kind of mess (drawn independently, so some have several).
MESS = {"chunked": 0.30, "aliases": 0.10, "system_mid": 0.04, "empty_turn": 0.04, "trailing_user": 0.05,
        "double_turn": 0.03, "enormous": 0.02, "tool_turn": 0.01, "no_exchange": 0.015}


def _text(rng: random.Random, words: int) -> str:
    vocab = ["model", "data", "train", "token", "layer", "answer", "python", "error", "memory", "speed", "the",
             "a", "is", "of", "to", "and", "in", "how", "why", "what"]
    return " ".join(rng.choice(vocab) for _ in range(words))


def conversation(rng: random.Random) -> list[dict]:
    """One conversation as a ShareGPT dump holds it."""
    mess = {k for k, p in MESS.items() if rng.random() < p}
    names = (rng.choice(USER_NAMES), rng.choice(ASSISTANT_NAMES)) if "aliases" in mess else ("human", "gpt")
    exchanges = rng.randint(40, 120) if "enormous" in mess else rng.choice([1, 1, 1, 2, 2, 3, 4, 6])
    length = (60, 200) if "enormous" in mess else (5, 120)
    turns = [{"from": "system", "value": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    if "chunked" in mess:  # the dump split a longer conversation: this chunk starts with the assistant
        turns += [{"from": names[1], "value": _text(rng, rng.randint(*length))} for _ in range(rng.randint(1, 2))]
    for i in range(exchanges):
        turns.append({"from": names[0], "value": _text(rng, rng.randint(5, 40))})
        if "double_turn" in mess and i == 0:
            turns.append({"from": names[0], "value": _text(rng, rng.randint(3, 10))})
        turns.append({"from": names[1], "value": _text(rng, rng.randint(*length))})
        if "system_mid" in mess and i == 0:
            turns.append({"from": "system", "value": "The user is on a phone."})
        if "tool_turn" in mess and i == 0:
            turns.append({"from": "function_response", "value": "{}"})
    if "empty_turn" in mess:
        rng.choice([t for t in turns if t["from"] != "system"])["value"] = rng.choice(["", " ", "\n"])
    if "trailing_user" in mess:
        turns.append({"from": names[0], "value": _text(rng, 8)})
    if "no_exchange" in mess:  # a chunk of assistant text only, or a question only
        turns = [{"from": rng.choice([names[1], names[0]]), "value": _text(rng, 30)}]
    return turns


def has_exchange(turns: list[dict]) -> bool:
    """A non-empty user turn followed, later, by a non-empty assistant turn (from the generator's own names)."""
    seen_user = False
    for t in turns:
        if not t["value"].strip():
            continue
        if t["from"] in USER_NAMES:
            seen_user = True
        elif t["from"] in ASSISTANT_NAMES and seen_user:
            return True
    return False


def yielding_rows(path: Path, tokenizer, max_length: int, repair: bool) -> tuple[set[int], Counter, Counter, int]:
    """Rows that yield >= 1 trainable example; drops and trims by reason; examples made."""
    from training.chat_format import encode_conversation
    from training.data import SourceConfig, normalise_source, read_rows, token_lengths
    from training.data.windows import fit_windows

    src = SourceConfig(path=str(path), format="sharegpt", repair=repair)
    drops: Counter = Counter()
    _, examples = normalise_source(src, read_rows(src), drops)
    trims = Counter(r for e in examples for r in e["trims"])
    lengths = token_lengths(tokenizer, [e["messages"] for e in examples])
    kept, made = set(), 0
    for e, n in zip(examples, lengths):
        windows = fit_windows(tokenizer, e["messages"], max_length, n) if repair else [(e["messages"], n)]
        for window, _ in windows:
            if encode_conversation(tokenizer, window, max_length) is not None:
                kept.add(e["row"])
                made += 1
    return kept, drops, trims, made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from chatbot.model_files import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # SmolLM2's ChatML template
    rng = random.Random(args.seed)
    convs = [conversation(rng) for _ in range(args.conversations)]
    with_exchange = {i for i, c in enumerate(convs) if has_exchange(c)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "messy_sharegpt.jsonl"
        path.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in convs), encoding="utf-8")
        results = {}
        for name, repair in (("strict (repair: false)", False), ("repair + windows (default)", True)):
            started = time.perf_counter()
            kept, drops, trims, made = yielding_rows(path, tokenizer, args.max_length, repair)
            results[name] = (len(kept & with_exchange) / len(with_exchange), drops, trims, made,
                             time.perf_counter() - started)

    print(f"messy ShareGPT-style corpus: {args.conversations} conversations (seed {args.seed}), "
          f"{len(with_exchange)} with a user->assistant exchange; max_length {args.max_length}; SmolLM2 tokenizer")
    print(f"{'rules':28} {'kept fraction':>13} {'examples':>9} {'seconds':>8}")
    for name, (fraction, _, _, made, seconds) in results.items():
        print(f"{name:28} {fraction:>13.1%} {made:>9} {seconds:>8.1f}")
    (before, *_), (after, drops, trims, *_) = results.values()
    print(f"after / before: {after / before:.2f}x; target >= {TARGET:.0%}: {'met' if after >= TARGET else 'NOT met'}")
    for label, counts in (("strict drops", list(results.values())[0][1]), ("repair drops", drops),
                          ("repair trims", trims)):
        print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v))


if __name__ == "__main__":
    main()
