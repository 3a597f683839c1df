"""The arena vote record: one JSON line per decided battle of the Space's Arena (a blind side-by-side of two models).

The Space writes it into the same files as its other feedback records (CHATBOT_FEEDBACK_DIR/feedback-*.jsonl,
optionally pushed to a Hub dataset); `"type": "arena"` tells the two apart (feedback records have no `type`).
ARENA_TYPE, LABELS, VOTES and the writer are the Space's (chatbot.arena_record); this module reads the records.

    {"type": "arena",
     "battle_id": "5f0c2d8e9a7b4c1e",            # random hex from the server that ran the battle; unique
     "timestamp": "2026-12-06T14:00:00Z",          # UTC, when the vote was cast
     "messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is LoRA?"}],   # the prompt both models answered, openai format,
                                                                    # system prompt included, ending in a user turn
     "replies": [{"label": "A",                   # the position the visitor saw
                  "model": {"name": "tuned",        # the leaderboard's key: one name per model served
                            "backend": "llama_cpp", "model": "USER/smollm2-kto", "file": "model-q4_k_m.gguf",
                            "adapter": null, "revision": null},    # how it was served (chatbot.feedback.model_info)
                  "reply": "LoRA trains two small matrices ...",
                  "sampling": {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 512, "seed": null}},
                 {"label": "B", "model": {"name": "base", ...}, "reply": "...", "sampling": {...}}],
     "vote": "A"}                                 # "A" | "B" | "tie" | "both_bad"

What a reader accepts (`parse_battle`; anything else is skipped and counted under the reason in brackets):
`type` is "arena"; `battle_id` a non-empty string [missing_field, bad_type], seen once (a repeated id is a copy
of the same vote [duplicate_battle]); `replies` exactly two objects labelled "A" and "B", each with a `reply` string and a
`model.name` that is a non-empty string [bad_replies]; `vote` one of VOTES [bad_vote]. `timestamp` and `sampling`
are informative, and the other `model` fields say how to serve that model again (CHATBOT_BACKEND, CHATBOT_MODEL,
CHATBOT_GGUF_FILE, CHATBOT_ADAPTER, CHATBOT_REVISION). Only battles the visitor decided are written: a battle with
no vote leaves no record. Training (training.data.preference) also needs a usable prompt and reply texts and
counts the same reasons as for feedback records; the leaderboard (training.evaluation.arena) needs only the above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatbot.arena_record import ARENA_TYPE, LABELS, VOTES
from chatbot.arena_record import vote_record as space_vote_record
from training.data.errors import Drop

ARENA_DROP_REASONS = {
    "bad_replies": "an arena record whose replies are not two objects labelled A and B, each with a reply string "
                   "and a model name",
    "bad_vote": "an arena record whose vote is not A, B, tie or both_bad",
    "duplicate_battle": "an arena record with the battle_id of an earlier one (a copy of the same vote)",
    "tie_vote": "an arena vote of tie: neither reply is preferred, nothing to learn (the leaderboard counts it)",
}


@dataclass(frozen=True)
class Reply:
    label: str      # "A" or "B": the side the visitor saw it on
    model: dict     # name, and how it was served (backend, model, file, adapter, revision)
    text: Any       # the reply as recorded (a string)
    sampling: dict

    @property
    def name(self) -> str:
        return self.model["name"]


@dataclass(frozen=True)
class Battle:
    battle_id: str
    timestamp: str
    messages: Any           # the prompt as recorded (openai messages)
    replies: dict[str, Reply]
    vote: str

    @property
    def decided(self) -> bool:
        return self.vote in LABELS

    @property
    def winner(self) -> Reply | None:
        return self.replies[self.vote] if self.decided else None

    @property
    def loser(self) -> Reply | None:
        return self.replies["B" if self.vote == "A" else "A"] if self.decided else None


def is_arena(row: Any) -> bool:
    return isinstance(row, dict) and row.get("type") == ARENA_TYPE


def parse_battle(row: dict) -> Battle:
    """The battle of one arena record; Drop(reason) when it is not one (see the module docstring)."""
    if not is_arena(row):
        raise Drop("missing_field")
    battle_id = row.get("battle_id")
    if not isinstance(battle_id, str) or not battle_id.strip():
        raise Drop("missing_field" if battle_id is None else "bad_type")
    replies = row.get("replies")
    if not isinstance(replies, list) or len(replies) != 2 or not all(isinstance(r, dict) for r in replies):
        raise Drop("bad_replies")
    by_label: dict[str, Reply] = {}
    for r in replies:
        model = r.get("model")
        if r.get("label") not in LABELS or r["label"] in by_label or not isinstance(r.get("reply"), str) \
                or not isinstance(model, dict) or not isinstance(model.get("name"), str) or not model["name"].strip():
            raise Drop("bad_replies")
        by_label[r["label"]] = Reply(r["label"], {**model, "name": model["name"].strip()}, r["reply"],
                                     r.get("sampling") if isinstance(r.get("sampling"), dict) else {})
    vote = row.get("vote")
    if vote not in VOTES:
        raise Drop("bad_vote")
    return Battle(battle_id.strip(), str(row.get("timestamp") or ""), row.get("messages"),
                  {label: by_label[label] for label in LABELS}, vote)


def first_seen(battle: Battle, seen: set[str]) -> Battle:
    """The battle, its id added to `seen`; Drop("duplicate_battle") when an earlier record had that id (a copy of
    the same vote counts once)."""
    if battle.battle_id in seen:
        raise Drop("duplicate_battle")
    seen.add(battle.battle_id)
    return battle


def vote_record(battle_id: str, timestamp: str, messages: list[dict], replies: list[dict], vote: str) -> dict:
    """The Space's arena record (chatbot.arena_record.vote_record, the writer it uses) of a battle voted at
    `timestamp`. `replies`: two {label, model, reply, sampling}, A then B. ValueError naming the reason when
    parse_battle, the one reader, would skip such a record (it fails here rather than later in training)."""
    try:
        parse_battle({"type": ARENA_TYPE, "battle_id": battle_id, "replies": replies, "vote": vote})
    except Drop as d:
        raise ValueError(f"not an arena record ({d.reason}): {ARENA_DROP_REASONS.get(d.reason, d.reason)}") from None
    record = space_vote_record(battle_id, messages, [{**r, "sampling": r.get("sampling") or {}} for r in replies], vote)
    record["timestamp"] = timestamp  # the Space stamps the time of the vote; a sample or test gives its own
    return record
