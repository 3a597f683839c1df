"""Write training/samples/arena_votes.jsonl: scripted votes of the Space's Arena, in the record format of
training/data/arena_record.py, written by the Space's own writer (chatbot.arena_record.vote_record, through
training.data.arena_record.vote_record, which gives it the scripted clock's time), for the leaderboard and the DPO
recipe's tests and docs.

The story, with a known answer: the Space's SmolLM2 ("base") meets the KTO CPU recipe's export ("kto") on
questions about this kit (make_sample.py's topics). The kto model gives the topic's direct answer 70% of the time,
the base 40%; otherwise a generic non-answer (make_feedback.py's). Visitors vote for the direct answer when only one
reply has it, tie when both do, both_bad when neither does. So kto wins 42% of battles, base 12%, 28% are ties and
18% both bad: kto's win rate, ties and both_bad counted as half a win each, is 65% (a Bradley-Terry gap of
400 log10(65/35) = 108 points). A few records are malformed or copied, to show they are skipped and counted.
Deterministic: rerunning rewrites the same file. These are not real visitors' votes.

    python training/samples/make_arena_votes.py
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent.parent))

from training.data.arena_record import vote_record  # noqa: E402

BATTLES = 200
GOOD_ANSWER_RATE = {"base": 0.4, "kto": 0.7}


def make_feedback():
    spec = importlib.util.spec_from_file_location("make_feedback", HERE / "make_feedback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(seed: int = 0, battles: int = BATTLES) -> list[dict]:
    feedback = make_feedback()
    models = {"base": {"name": "base", **feedback.MODEL},
              "kto": {"name": "kto", "backend": "llama_cpp", "model": "runs/smollm2-135m-kto-cpu/gguf",
                      "file": "model-q4_k_m.gguf", "adapter": None, "revision": None}}
    rng = random.Random(seed)
    topics = feedback.topics()
    clock = datetime(2026, 12, 6, 9, 0, tzinfo=timezone.utc)
    rows: list[dict] = []
    for _ in range(battles):
        questions, answer = rng.choice(topics)
        messages = [{"role": "system", "content": feedback.SYSTEM}, {"role": "user", "content": rng.choice(questions)}]
        sides = ["base", "kto"]
        rng.shuffle(sides)  # which model is A is random, as in the Space
        good = {name: rng.random() < GOOD_ANSWER_RATE[name] for name in sides}
        replies = [{"label": label, "model": models[name], "reply": answer if good[name] else feedback.non_answer(rng),
                    "sampling": feedback.SAMPLING} for label, name in zip("AB", sides)]
        if good[sides[0]] != good[sides[1]]:
            vote = "A" if good[sides[0]] else "B"
        else:
            vote = "tie" if good[sides[0]] else "both_bad"
        clock += timedelta(seconds=rng.randint(20, 600))
        rows.append(vote_record(f"{rng.getrandbits(64):016x}", clock.strftime("%Y-%m-%dT%H:%M:%SZ"), messages,
                                replies, vote))
    # As a buggy client, a hand edit or a copied file would leave them: skipped and counted.
    rows.insert(11, {**rows[10], "battle_id": "0badc0de", "vote": "C"})                        # bad_vote
    rows.insert(23, {**rows[22], "battle_id": "0badbeef", "replies": rows[22]["replies"][:1]})  # bad_replies
    rows.insert(37, dict(rows[5]))                                                              # duplicate_battle
    return rows


def main() -> None:
    rows, path = build(), HERE / "arena_votes.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} arena records to {path}")


if __name__ == "__main__":
    main()
