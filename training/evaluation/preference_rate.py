"""Held-out preference rate: how often a model gives the chosen reply a higher log-probability than the rejected one.

Each reply is scored as the sum of the log-probabilities of its tokens after the prompt, on exactly the tokens
training's mask covers (training.chat_format.encode_conversation: the reply's content and its end-of-turn token),
so a DPO / KTO run is judged on what it was trained to move. Ties count half; 0.5 is chance.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from training.chat_format import IGNORE_INDEX, encode_conversation, prompt_ids


def reply_example(tokenizer, prompt: list[dict], reply: str, max_length: int) -> dict | None:
    """input_ids / labels of prompt + reply with only the reply's trained tokens labelled; None when cut off."""
    ex = encode_conversation(tokenizer, prompt + [{"role": "assistant", "content": reply}], max_length)
    if ex is None:
        return None
    start = len(prompt_ids(tokenizer, prompt))  # earlier assistant turns are shared by both replies: not scored
    labels = [IGNORE_INDEX] * min(start, len(ex["labels"])) + ex["labels"][start:]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ex["input_ids"], "labels": labels}


def sequence_logps(model, examples: Sequence[dict], batch_size: int = 8) -> list[float]:
    """Sum of log p(label token) over the labelled positions of each example (right-padded batches)."""
    import torch

    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in batch])
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch])
            labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]
            target = labels[:, 1:]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out.extend((logp * (target != IGNORE_INDEX)).sum(-1).tolist())
    return out


def preference_rate(model, tokenizer, pairs: Sequence[dict], max_length: int = 2048) -> dict[str, Any]:
    """pairs: {"prompt": messages, "chosen": text, "rejected": text} (training.data.preference.heldout_pairs).

    Returns preference_rate (share of pairs with logp(chosen) > logp(rejected), ties half), mean_margin (mean
    logp(chosen) - logp(rejected), in nats), pairs scored and pairs skipped (a reply cut off by max_length)."""
    scored, skipped = [], 0
    for p in pairs:
        chosen = reply_example(tokenizer, p["prompt"], p["chosen"], max_length)
        rejected = reply_example(tokenizer, p["prompt"], p["rejected"], max_length)
        if chosen is None or rejected is None:
            skipped += 1
        else:
            scored.append((chosen, rejected))
    if not scored:
        return {"preference_rate": None, "mean_margin": None, "pairs": 0, "skipped_pairs": skipped}
    logps = sequence_logps(model, [e for pair in scored for e in pair])
    margins = [logps[2 * k] - logps[2 * k + 1] for k in range(len(scored))]
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {"preference_rate": wins / len(margins), "mean_margin": sum(margins) / len(margins),
            "pairs": len(margins), "skipped_pairs": skipped}


def load_heldout_pairs(source: str) -> tuple[list[dict], str]:
    """(pairs, description) from a dpo/kto recipe or its run dir (the prompts that recipe holds out, as finetune.py
    splits them) or a preference data file (all its pairs: pairs, ratings or the Space's feedback records)."""
    from training.data import DataConfig, DataError, SourceConfig
    from training.data.preference import dpo_rows, heldout_pairs, load_judgements, prepare_preference_data

    path = Path(source).expanduser()
    recipe = path / "config.yaml" if path.is_dir() and (path / "config.yaml").is_file() else \
        path if path.suffix in (".yaml", ".yml") else None
    if recipe is not None:
        from training.config import load_config
        from training.paths import resolve_recipe_paths

        cfg = load_config(recipe)
        resolve_recipe_paths(cfg)
        pairs = heldout_pairs(prepare_preference_data(cfg.data, "dpo", log=None).validation)
        what = f"held-out prompts of {recipe}"
    else:
        found, ratings, _ = load_judgements(DataConfig(sources=[SourceConfig(path=source)]), log=lambda _m: None)
        pairs = [{"prompt": r["prompt"], "chosen": r["chosen"][-1]["content"], "rejected": r["rejected"][-1]["content"]}
                 for r in dpo_rows(found, ratings)]
        what = str(source)
    if not pairs:
        raise DataError(f"--preference-data {source!r} gives no held-out pair; accepted: a dpo/kto recipe or run dir "
                        "whose held-out prompts have a desirable and an undesirable reply, or a preference data file")
    return pairs, what
