"""Held-out preference figures: how a model ranks the chosen reply of a pair against the rejected one.

Each reply is scored as the sum of the log-probabilities of its tokens after the prompt, on exactly the tokens
training's mask covers (training.chat_format.encode_conversation: the reply's content and its end-of-turn token).

- **Reward accuracy and margin** (what DPO / KTO optimise; TRL's `rewards/accuracies` and `rewards/margins`): against
  a reference model (the base the run started from), a reply's implicit reward is
  beta * (log pi(reply) - log pi_ref(reply)); the accuracy is the share of pairs whose chosen reply gets the strictly
  higher reward, the margin the mean reward difference. What the base already preferred, and the length of the
  replies, cancel: only what training moved counts. The reference itself scores 0% / 0.
- **Log-prob rate** (no reference; kept for what it is): the share of pairs where log pi(chosen) > log pi(rejected),
  ties half, and the mean difference in nats. It favours short replies (fewer tokens to lose probability on) and
  whatever the base preferred before any training, so a base can score 0% and a well-trained model still lose.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from training.chat_format import IGNORE_INDEX, encode_conversation, prompt_ids
from training.paths import recipe_of

if TYPE_CHECKING:
    from training.config import TrainConfig

DEFAULT_BETA = 0.1  # TrainSection.beta's default


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


def pair_logps(model, tokenizer, pairs: Sequence[dict], max_length: int = 2048) -> list[tuple[float, float] | None]:
    """(log p(chosen), log p(rejected)) per pair, in order; None for a pair with a reply cut off by max_length.

    pairs: {"prompt": messages, "chosen": text, "rejected": text} (training.data.preference.heldout_pairs)."""
    examples: list[tuple[dict, dict] | None] = []
    for p in pairs:
        chosen = reply_example(tokenizer, p["prompt"], p["chosen"], max_length)
        rejected = reply_example(tokenizer, p["prompt"], p["rejected"], max_length)
        examples.append(None if chosen is None or rejected is None else (chosen, rejected))
    scored = [e for e in examples if e is not None]
    flat = iter(sequence_logps(model, [ex for pair in scored for ex in pair])) if scored else iter(())
    return [None if e is None else (next(flat), next(flat)) for e in examples]


def preference_figures(logps: Sequence[tuple[float, float] | None],
                       reference: Sequence[tuple[float, float] | None] | None = None,
                       beta: float = DEFAULT_BETA) -> dict[str, Any]:
    """The figures of the module docstring from pair_logps of the model (and of the reference model, same pairs).

    reward_accuracy / reward_margin (None without a reference), logp_rate / logp_margin, pairs (scored by the
    model), reward_pairs (scored by both), skipped_pairs (a reply cut off by max_length), beta."""
    scored = [lp for lp in logps if lp is not None]
    out: dict[str, Any] = {"logp_rate": None, "logp_margin": None, "reward_accuracy": None, "reward_margin": None,
                           "pairs": len(scored), "reward_pairs": 0, "skipped_pairs": len(logps) - len(scored),
                           "beta": beta}
    if scored:
        raw = [c - r for c, r in scored]
        out["logp_rate"] = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in raw) / len(raw)
        out["logp_margin"] = sum(raw) / len(raw)
    if reference is not None:
        if len(reference) != len(logps):
            raise ValueError(f"reference log-probs for {len(reference)} pairs, model's for {len(logps)}")
        both = [(lp, ref) for lp, ref in zip(logps, reference) if lp is not None and ref is not None]
        margins = [beta * ((c - c_ref) - (r - r_ref)) for (c, r), (c_ref, r_ref) in both]
        out["reward_pairs"] = len(margins)
        if margins:
            out["reward_accuracy"] = sum(m > 0 for m in margins) / len(margins)  # TRL: chosen > rejected, strictly
            out["reward_margin"] = sum(margins) / len(margins)
    return out


def preference_rate(model, tokenizer, pairs: Sequence[dict], max_length: int = 2048,
                    reference: Sequence[tuple[float, float] | None] | None = None,
                    beta: float = DEFAULT_BETA) -> dict[str, Any]:
    """preference_figures of `model` on `pairs`; `reference`: pair_logps of the reference model on the same pairs."""
    return preference_figures(pair_logps(model, tokenizer, pairs, max_length), reference, beta)


def load_heldout_pairs(source: str, recipe: TrainConfig | None) -> tuple[list[dict], str]:
    """(pairs, description) from a dpo/kto recipe or its run dir (`recipe`: that recipe, loaded once by the caller;
    the prompts it holds out, as finetune.py splits them) or a preference data file (`recipe` None: all its pairs:
    pairs, ratings or the Space's feedback records)."""
    from training.data import DataConfig, DataError, SourceConfig
    from training.data.preference import dpo_rows, heldout_pairs, load_judgements, prepare_preference_data

    if recipe is not None:
        pairs = heldout_pairs(prepare_preference_data(recipe.data, "dpo", log=None).validation)
        what = f"held-out prompts of {recipe_of(source)}"
    else:
        found, ratings, _ = load_judgements(DataConfig(sources=[SourceConfig(path=source)]), log=lambda _m: None)
        pairs = [{"prompt": r["prompt"], "chosen": r["chosen"][-1]["content"], "rejected": r["rejected"][-1]["content"]}
                 for r in dpo_rows(found, ratings)]
        what = str(source)
    if not pairs:
        raise DataError(f"--preference-data {source!r} gives no held-out pair; accepted: a dpo/kto recipe or run dir "
                        "whose held-out prompts have a desirable and an undesirable reply, or a preference data file")
    return pairs, what
