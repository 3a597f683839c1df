"""The Arena's vote record as the Space writes it: one JSON line per decided battle, in the feedback files beside the
thumbs records (CHATBOT_FEEDBACK_DIR/feedback-*.jsonl, pushed with them to CHATBOT_FEEDBACK_DATASET).

The format is training/data/arena_record.py's: its docstring is the reference and its parse_battle the one reader
(tests/test_arena_app.py reads what this module writes with it). The Space cannot import training/ (a deployed
Space holds chatbot/ only), so the writer is here:

    {"type": "arena", "battle_id": "<random hex>", "timestamp": "2026-12-06T14:00:00Z",
     "messages": [{"role": "system", ...}, {"role": "user", ...}],
     "replies": [{"label": "A", "model": {"name": ..., "backend": ..., "model": ..., "file": ..., "adapter": ...,
                  "revision": ...}, "reply": "...", "sampling": {...}}, {"label": "B", ...}],
     "vote": "A" | "B" | "tie" | "both_bad"}
"""
from __future__ import annotations

import time

from chatbot.feedback import model_info

ARENA_TYPE = "arena"
LABELS = ("A", "B")
VOTES = ("A", "B", "tie", "both_bad")


def model_name(info: dict) -> str:
    """The leaderboard's key for a served model (chatbot.feedback.model_info): one stable name per model. The
    adapter when there is one, else the model with the GGUF file picked inside it, and the Hub revision if set."""
    name = str(info.get("adapter") or info.get("model") or info.get("backend"))
    file = info.get("file")
    if file and not info.get("adapter") and not name.endswith(str(file)):
        name += f"/{file}"
    return name + (f"@{info['revision']}" if info.get("revision") else "")


def served_model(settings, backend) -> dict:
    """What a record says about one side: the model's name, then how it was served."""
    info = model_info(settings, backend)
    return {"name": model_name(info), **info}


def vote_record(battle_id: str, messages: list[dict], replies: list[dict], vote: str) -> dict:
    """A decided battle as one record. `replies`: {label, model, reply, sampling} for A then B."""
    assert vote in VOTES and [r["label"] for r in replies] == list(LABELS)
    return {"type": ARENA_TYPE, "battle_id": battle_id,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "messages": messages,
            "replies": [{"label": r["label"], "model": r["model"], "reply": r["reply"], "sampling": r["sampling"]}
                        for r in replies],
            "vote": vote}
