"""Write training/samples/feedback.jsonl: ratings as the chat Space records them (chatbot/feedback.py), for the KTO /
DPO CPU recipe.

The story it tells: visitors asked the served SmolLM2 about this kit, liked the direct answers (the answers of
make_sample.py's topics) and disliked, or regenerated, generic non-answers ("Great question! It depends on your use
case. I hope this helps!"). One prompt per topic, so the recipe's held-out prompts are topics never trained on:
what must generalise is the visitors' taste, not the facts. Some turns are rated with thumbs, some were regenerated
(retried) and the better reply kept; a few rows are malformed or withdrawn, to show they are skipped and counted.
Deterministic: rerunning rewrites the same file.

    python training/samples/make_feedback.py
"""
from __future__ import annotations

import importlib.util
import json
import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You are a helpful assistant."  # the Space's default system prompt (CHATBOT_SYSTEM_PROMPT)
MODEL = {"backend": "llama_cpp", "model": "embedded", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "adapter": None,
         "revision": None}
SAMPLING = {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 512, "seed": None}

OPENERS = ["Great question!", "That's an interesting question.", "Sure!", "Good question.", "Well,",
           "Thanks for asking!", "Absolutely!"]
BODIES = ["There are many factors to consider, and it really depends on your use case.",
          "It is a complex topic and there is no single answer that works for everyone.",
          "I'm not able to give a definitive answer to that without more context.",
          "I'm sorry, but I can't help with that request.",
          "As an AI language model, I don't have personal experience with this.",
          "Different people have different opinions about this, and all of them have merit.",
          "This is something that many people wonder about, and the answer can vary."]
CLOSERS = ["You may want to search online for more information.", "I hope this helps!",
           "Let me know if you have any other questions.", "It's always best to consult the documentation.",
           "Feel free to experiment and see what works for you.", ""]


def topics() -> list[tuple[list[str], str]]:
    spec = importlib.util.spec_from_file_location("make_sample", HERE / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TOPICS


def non_answer(rng: random.Random) -> str:
    parts = [rng.choice(OPENERS), *rng.sample(BODIES, rng.choice([1, 2])), rng.choice(CLOSERS)]
    return " ".join(p for p in parts if p)


def build(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    clock = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
    rows: list[dict] = []

    def record(conversation: str, messages: list[dict], reply: str, rating: str | None) -> dict:
        nonlocal clock
        clock += timedelta(seconds=rng.randint(5, 300))
        return {"conversation_id": conversation, "timestamp": clock.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "messages": messages, "reply": reply, "rating": rating, "model": MODEL, "sampling": SAMPLING}

    for questions, answer in topics():
        conversation = uuid.UUID(int=rng.getrandbits(128)).hex
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": rng.choice(questions)}]
        bad = non_answer(rng)
        style = rng.random()
        if style < 0.35:    # regenerated: the non-answer was thrown away, the answer kept
            rows += [record(conversation, messages, bad, "retried"), record(conversation, messages, answer, "kept")]
        elif style < 0.7:   # both replies got thumbs (one visitor after a retry, or two visitors)
            rows += [record(conversation, messages, bad, "down"), record(conversation, messages, answer, "up")]
        else:               # thumbs on one reply of each kind, in either order
            first = [record(conversation, messages, answer, "up"), record(conversation, messages, bad, "down")]
            rows += first if rng.random() < 0.5 else first[::-1]
        if rng.random() < 0.05:  # a thumbs up on another reply, taken back: the later null rating withdraws it
            other = non_answer(rng)
            rows.append(record(conversation, messages, other, "up"))
            rows.append(record(conversation, messages, other, None))
    # Malformed rows, as a buggy client or a hand-edited file would leave them: skipped and counted.
    rows.insert(7, {"conversation_id": "x", "messages": [{"role": "user", "content": "Hi"}], "reply": "Hello!",
                    "rating": "meh"})
    rows.insert(19, {"conversation_id": "y", "messages": [], "reply": "Hello!", "rating": "up"})
    return rows


def main() -> None:
    rows = build()
    path = HERE / "feedback.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} feedback records to {path}")


if __name__ == "__main__":
    main()
