"""Preference data for `train.objective: dpo | kto`: pairs, unpaired ratings and the Space's feedback records.

Formats (a source's `format`, or `auto` from its columns):

    pairs     prompt (messages or text) + chosen + rejected (a reply: text or assistant messages). Without a prompt,
              chosen / rejected are whole conversations and the prompt is their shared beginning (TRL's implicit form)
    ratings   prompt + completion + label (true/false, 1/0, up/down)
    feedback  the chat Space's records (chatbot/feedback.py): messages + reply + rating up/down/retried/kept/null;
              the latest rating of a reply wins, null withdraws it; up/kept -> desirable, down/retried -> not;
              and its arena votes (training.data.arena_record, `"type": "arena"`), read from the same files: a
              vote for A or B is a pair (the voted reply chosen), both_bad two undesirable replies, a tie nothing
              (counted as tie_vote)

Every row becomes judgements on a prompt: a pair, or a rated reply. Rows are grouped by prompt (the conversation
before the reply, system prompt included) and whole groups are held out, so a held-out prompt is never trained on.
Then for KTO every judgement is a labelled completion (a pair gives one desirable and one undesirable), and for DPO
every undesirable reply is paired with a desirable one of the same prompt (from feedback: the reply kept or liked
for the same turn); what finds no partner is dropped as `unpaired`. Malformed rows are skipped and counted.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Any, Callable

from training.data import (DROP_REASONS, DataConfig, DataError, DataReport, Drop, PreparedData, SourceConfig,
                           SourceReport, read_rows, source_name, validate)
from training.data.arena_record import ARENA_DROP_REASONS, Battle, first_seen, is_arena, parse_battle

OBJECTIVES = ("sft", "dpo", "kto")
PREFERENCE_FORMATS = ("auto", "pairs", "ratings", "feedback")
PREFERENCE_DROP_REASONS = {
    **DROP_REASONS,
    "bad_label": "a rating / label that is not true/false (1/0, up/down; feedback: up/down/retried/kept/null)",
    "same_reply": "chosen and rejected are the same text",
    "withdrawn": "a feedback rating the visitor took back (rating null), or replaced by a later one",
    "unpaired": "DPO: a rated reply with no reply of the opposite rating for the same prompt",
    **ARENA_DROP_REASONS,
}
POSITIVE = {"up": True, "kept": True, "down": False, "retried": False}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def detect_preference_format(rows: list[Any], name: str = "source") -> str:
    keys: set[str] = set()
    for row in rows[:100]:
        if isinstance(row, dict):
            keys.update(k for k, v in row.items() if v is not None)
    if {"chosen", "rejected"} <= keys:
        return "pairs"
    if {"completion", "label"} <= keys:
        return "ratings"
    if {"messages", "reply", "rating"} <= keys or {"messages", "reply"} <= keys \
            or {"messages", "replies", "vote"} <= keys:  # arena votes only
        return "feedback"
    raise DataError(f"cannot detect the preference format of {name} from its columns {sorted(keys)}; accepted: "
                    "pairs (prompt, chosen, rejected), ratings (prompt, completion, label) or the Space's feedback "
                    "records (messages, reply, rating)")


# ---------------------------------------------------------------- one row -> judgements

def _text(value: Any) -> str:
    """A turn's text (a string or OpenAI content parts), stripped; Drop when missing, not text or empty."""
    if value is None:
        raise Drop("missing_field")
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise Drop("bad_type")
    if not value.strip():
        raise Drop("empty_turn")
    return value.strip()


def _messages(value: Any) -> list[dict]:
    """A prompt / conversation: plain text (one user turn) or openai messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value)}]
    if value is None:
        raise Drop("missing_field")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise Drop("bad_type")
    out = []
    for m in value:
        role = MESSAGE_ROLES.get(str(m.get("role", "")).strip().lower())
        if role is None:
            raise Drop("unknown_role" if m.get("role") is not None else "missing_field")
        out.append({"role": role, "content": _text(m.get("content"))})
    return out


def _reply(value: Any) -> str:
    """A reply: text, or assistant messages (their text joined)."""
    if isinstance(value, list):
        msgs = _messages(value)
        if any(m["role"] != "assistant" for m in msgs):
            raise Drop("not_alternating")
        return "\n".join(m["content"] for m in msgs)
    return _text(value)


def _prompt(messages: list[dict], reply: str, system: str | None) -> list[dict]:
    has_system = bool(messages) and messages[0]["role"] == "system"
    prompt = messages if has_system or not system else [{"role": "system", "content": system}] + messages
    validate(prompt + [{"role": "assistant", "content": reply}])
    return prompt


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "up", "yes", "good", "false", "0", "down",
                                                            "no", "bad"):
        return value.strip().lower() in ("true", "1", "up", "yes", "good")
    raise Drop("bad_label")


def pair_row(row: dict, system: str | None = None) -> tuple[list[dict], str, str]:
    if "chosen" not in row or "rejected" not in row or row["chosen"] is None or row["rejected"] is None:
        raise Drop("missing_field")
    if row.get("prompt") is None:  # implicit prompt: two whole conversations sharing their beginning
        chosen, rejected = _messages(row["chosen"]), _messages(row["rejected"])
        if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
            raise Drop("missing_field")
        prompt, good, bad = chosen[:-1], _reply(chosen[-1:]), _reply(rejected[-1:])
    else:
        prompt, good, bad = _messages(row["prompt"]), _reply(row["chosen"]), _reply(row["rejected"])
    if good.strip() == bad.strip():
        raise Drop("same_reply")
    return _prompt(prompt, good, system), good, bad


def rating_row(row: dict, system: str | None = None) -> tuple[list[dict], str, bool]:
    if row.get("prompt") is None or row.get("completion") is None or "label" not in row:
        raise Drop("missing_field")
    completion = _reply(row["completion"])
    return _prompt(_messages(row["prompt"]), completion, system), completion, _label(row["label"])


def feedback_row(row: dict, system: str | None = None) -> tuple[list[dict], str, bool | None]:
    """(prompt, reply, desirable or None for a withdrawn rating) of one Space feedback record."""
    if row.get("messages") is None or row.get("reply") is None or "rating" not in row:
        raise Drop("missing_field")
    rating = row["rating"]
    if rating is not None and rating not in POSITIVE:
        raise Drop("bad_label")
    reply = _reply(row["reply"])
    return _prompt(_messages(row["messages"]), reply, system), reply, None if rating is None else POSITIVE[rating]


def arena_row(battle: Battle, system: str | None = None) -> tuple[list[dict], str | None, list[str]]:
    """(prompt, the reply voted for or None, the undesirable replies) of one arena vote (parsed by
    training.data.arena_record.parse_battle): A or B gives a pair, both_bad two undesirable replies; Drop for a tie
    or an unusable prompt or reply."""
    if battle.vote == "tie":
        raise Drop("tie_vote")
    if battle.decided:
        good, bad = _reply(battle.winner.text), _reply(battle.loser.text)
        if good == bad:
            raise Drop("same_reply")
        return _prompt(_messages(battle.messages), good, system), good, [bad]
    bad = [_reply(r.text) for r in battle.replies.values()]
    return _prompt(_messages(battle.messages), bad[0], system), None, bad


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def read_judgements(src: SourceConfig, rows: list[Any], drops: Counter) -> tuple[str, list[dict], list[dict]]:
    """(format, pairs {prompt, chosen, rejected}, ratings {prompt, completion, label}) of one source."""
    name = source_name(src)
    fmt = detect_preference_format(rows, name) if src.format == "auto" else src.format
    if fmt not in PREFERENCE_FORMATS[1:]:
        raise DataError(f"format={src.format!r} for source {name!r}; accepted with train.objective dpo/kto: "
                        f"{', '.join(PREFERENCE_FORMATS)}")
    drops["invalid_json"] += sum(1 for r in rows if not isinstance(r, dict))
    pairs, ratings = [], []
    latest: dict[tuple[str, str], tuple[int, dict | None]] = {}  # feedback: the last rating of each reply wins
    battles: set[str] = set()  # arena: the battle ids read, so a copied vote counts once
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        try:
            if fmt == "pairs":
                prompt, good, bad = pair_row(row, src.system)
                pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
            elif fmt == "ratings":
                prompt, completion, label = rating_row(row, src.system)
                ratings.append({"prompt": prompt, "completion": completion, "label": label})
            elif is_arena(row):
                prompt, good, bad = arena_row(first_seen(parse_battle(row), battles), src.system)
                if good is not None:
                    pairs.append({"prompt": prompt, "chosen": good, "rejected": bad[0]})
                else:
                    ratings += [{"prompt": prompt, "completion": reply, "label": False} for reply in bad]
            else:
                prompt, reply, label = feedback_row(row, src.system)
                key = (prompt_key(prompt), reply)
                if key in latest:
                    drops["withdrawn"] += 1
                stamp = str(row.get("timestamp") or "")
                if key not in latest or stamp >= latest[key][0]:
                    latest[key] = (stamp, None if label is None else
                                   {"prompt": prompt, "completion": reply, "label": label})
        except Drop as d:
            drops[d.reason] += 1
    for stamp, rating in latest.values():
        if rating is None:
            drops["withdrawn"] += 1
        else:
            ratings.append(rating)
    return fmt, pairs, ratings


# ---------------------------------------------------------------- judgements -> trainer rows

def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def kto_rows(pairs: list[dict], ratings: list[dict]) -> list[dict]:
    """TRL's unpaired preference format (conversational): prompt, completion, label; duplicates removed."""
    out, seen = [], set()
    items = [(p["prompt"], p["chosen"], True) for p in pairs] + [(p["prompt"], p["rejected"], False) for p in pairs] \
        + [(r["prompt"], r["completion"], r["label"]) for r in ratings]
    for prompt, completion, label in items:
        key = (prompt_key(prompt), completion, label)
        if key not in seen:
            seen.add(key)
            out.append({"prompt": prompt, "completion": _assistant(completion), "label": label})
    return out


def dpo_rows(pairs: list[dict], ratings: list[dict], drops: Counter | None = None) -> list[dict]:
    """TRL's preference format (conversational): prompt, chosen, rejected. Rated replies of one prompt are paired:
    each undesirable one with a desirable one (round robin); the rest are counted as `unpaired`."""
    out = [{"prompt": p["prompt"], "chosen": _assistant(p["chosen"]), "rejected": _assistant(p["rejected"])}
           for p in pairs]
    groups: dict[str, dict[bool, list[dict]]] = defaultdict(lambda: {True: [], False: []})
    for r in ratings:
        groups[prompt_key(r["prompt"])][r["label"]].append(r)
    unpaired = 0
    for group in groups.values():
        good, bad = group[True], group[False]
        if not good or not bad:
            unpaired += len(good) + len(bad)
            continue
        for i, b in enumerate(bad):
            out.append({"prompt": b["prompt"], "chosen": _assistant(good[i % len(good)]["completion"]),
                        "rejected": _assistant(b["completion"])})
        unpaired += max(0, len(good) - len(bad))
    if drops is not None and unpaired:
        drops["unpaired"] += unpaired
    return out


def heldout_pairs(rows: list[dict]) -> list[dict]:
    """(prompt, chosen text, rejected text) pairs from rows of any objective's shape, for the preference rate."""
    pairs, ratings = [], []
    for r in rows:
        if "chosen" in r:
            pairs.append({"prompt": r["prompt"], "chosen": r["chosen"][-1]["content"],
                          "rejected": r["rejected"][-1]["content"]})
        elif "completion" in r:
            ratings.append({"prompt": r["prompt"], "completion": r["completion"][-1]["content"], "label": r["label"]})
    return [{"prompt": p["prompt"], "chosen": p["chosen"][-1]["content"], "rejected": p["rejected"][-1]["content"]}
            for p in dpo_rows(pairs, ratings)]


def to_objective(objective: str, pairs: list[dict], ratings: list[dict], drops: Counter | None = None) -> list[dict]:
    if objective == "kto":
        return kto_rows(pairs, ratings)
    if objective == "dpo":
        return dpo_rows(pairs, ratings, drops)
    raise DataError(f"train.objective={objective!r} has no preference data shape; accepted: dpo, kto")


# ---------------------------------------------------------------- the pipeline

def _split_by_prompt(pairs: list[dict], ratings: list[dict], fraction: float, rng: random.Random):
    """Hold out whole prompts (all their judgements), so no held-out prompt is trained on."""
    keys = sorted({prompt_key(x["prompt"]) for x in pairs + ratings})
    if fraction <= 0 or len(keys) < 2:
        return (pairs, ratings), ([], [])
    held = set(rng.sample(keys, min(len(keys) - 1, max(1, round(fraction * len(keys))))))
    side = lambda xs, inside: [x for x in xs if (prompt_key(x["prompt"]) in held) == inside]  # noqa: E731
    return (side(pairs, False), side(ratings, False)), (side(pairs, True), side(ratings, True))


def load_judgements(cfg: DataConfig, log: Callable[[str], Any]) -> tuple[list[dict], list[dict], DataReport]:
    report = DataReport(length_unit="characters", config=asdict(cfg))
    pairs, ratings = [], []
    for src in cfg.sources:
        log(f"data: reading {source_name(src)}")
        rows = read_rows(src)
        drops: Counter = Counter()
        fmt, p, r = read_judgements(src, rows, drops)
        report.sources.append(SourceReport(name=source_name(src), format=fmt, rows=len(rows), valid=len(p) + len(r),
                                           dropped=dict(drops)))
        pairs += p
        ratings += r
    return pairs, ratings, report


def prepare_preference_data(cfg: DataConfig, objective: str, log: Callable[[str], Any] | None = print) -> PreparedData:
    """Train / validation rows in TRL's conversational shape for `objective` (dpo or kto), with a data report.
    validation_fraction holds out whole prompts (seeded); validation_path names a fixed held-out file."""
    log = log or (lambda _msg: None)
    if not cfg.sources:
        raise DataError("data.sources is empty; accepted: a list of at least one preference source")
    if not 0 <= cfg.validation_fraction < 1:
        raise DataError(f"validation_fraction={cfg.validation_fraction!r}; accepted: 0 <= value < 1")
    pairs, ratings, report = load_judgements(cfg, log)
    if cfg.validation_path:
        (val_pairs, val_ratings, _) = load_judgements(DataConfig(sources=[SourceConfig(path=cfg.validation_path)]),
                                                      log)
        held = {prompt_key(x["prompt"]) for x in val_pairs + val_ratings}
        leak = [x for x in pairs + ratings if prompt_key(x["prompt"]) in held]
        pairs = [x for x in pairs if prompt_key(x["prompt"]) not in held]
        ratings = [x for x in ratings if prompt_key(x["prompt"]) not in held]
        if leak and report.sources:
            report.sources[0].dropped["in_validation"] = len(leak)
    else:
        (pairs, ratings), (val_pairs, val_ratings) = _split_by_prompt(
            pairs, ratings, cfg.validation_fraction, random.Random(f"{cfg.seed}/preference-split"))
    drops: Counter = Counter()
    train = to_objective(objective, pairs, ratings, drops)
    # KTO trains in this order (its KL term needs a fixed one): mix desirable and undesirable rows, seeded.
    random.Random(f"{cfg.seed}/preference-order").shuffle(train)
    validation = to_objective(objective, val_pairs, val_ratings)
    if cfg.max_rows is not None:
        train = random.Random(f"{cfg.seed}/preference-max-rows").sample(train, min(cfg.max_rows, len(train)))
    if cfg.max_validation_rows is not None:
        validation = validation[: cfg.max_validation_rows]
    if drops and report.sources:
        for reason, n in drops.items():
            report.sources[0].dropped[reason] = report.sources[0].dropped.get(reason, 0) + n
    for s in report.sources:
        s.dropped = {k: n for k, n in s.dropped.items() if n}
        if s.dropped:
            log(f"data: {s.name}: dropped " + ", ".join(f"{n} {k}" for k, n in sorted(s.dropped.items())))
    report.train_rows, report.validation_rows = len(train), len(validation)
    if len(report.sources) == 1:
        report.sources[0].validation, report.sources[0].train = len(validation), len(train)
    report.train_lengths = [sum(len(m["content"]) for m in r["prompt"]) for r in train]
    report.validation_lengths = [sum(len(m["content"]) for m in r["prompt"]) for r in validation]
    if not train:
        raise DataError(f"no usable {objective} training rows left (see the drops above); accepted: preference pairs, "
                        "ratings or feedback records" + (" with both a desirable and an undesirable reply per prompt"
                                                         if objective == "dpo" else ""))
    log(f"data: {objective}: train={len(train)} validation={len(validation)} rows "
        f"({len(heldout_pairs(validation))} held-out pairs)")
    return PreparedData(train=train, validation=validation, report=report)
