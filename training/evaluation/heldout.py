"""Held-out rows of a recipe and the loss of a model on them, masked exactly as training masks.

Used by evaluate.py (model comparison) and sweep.py (ranking grid points).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from training.config import TrainConfig
from training.data import DataError


def recipe_heldout_rows(cfg: TrainConfig, max_rows: int | None = None) -> list[dict]:
    """The rows finetune.py holds out for this recipe (its data.validation_path, or its seeded validation split).

    The split is taken before any filter, so the token-length filters (which need a tokenizer) are off here.
    """
    from training.data import prepare_data

    data = cfg.data
    saved = (data.min_tokens, data.max_tokens)
    data.min_tokens = data.max_tokens = None
    try:
        rows = prepare_data(data, tokenizer=None, log=None).validation
    finally:
        data.min_tokens, data.max_tokens = saved
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError("the recipe's data gives no held-out rows; accepted: data.validation_fraction > 0 or "
                        "data.validation_path")
    return rows


def load_for_loss(source: str | Path, chat_template: str | None = None, device: str = "cpu"):
    """(model, tokenizer) in fp32; a .gguf is dequantised by transformers. The tokenizer is prepared as
    finetune.py prepares it, so the masking matches training token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.chat_format import prepare_tokenizer

    source = Path(source) if Path(str(source)).exists() else source
    kwargs: dict[str, Any] = {}
    if isinstance(source, Path) and source.is_file():
        source, kwargs = source.parent, {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, **kwargs).eval()
    if prepare_tokenizer(tokenizer, chat_template) and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # a pad token only: never a label, never attended to
    return model.to(device), tokenizer


def heldout_loss(model, tokenizer, conversations: Sequence[dict], max_length: int = 2048,
                 batch_tokens: int = 4096) -> dict[str, Any]:
    """Loss on the assistant tokens of held-out conversations, masked by training.chat_format.encode_conversation.

    loss = total NLL of every masked (label != -100) next-token prediction / number of such tokens, pooled over
    all rows (long answers weigh more, as in training); perplexity = exp(loss).
    """
    import torch
    import torch.nn.functional as F

    from training.chat_format import IGNORE_INDEX, encode_conversation

    encoded, skipped = [], 0
    for row in conversations:
        try:
            ex = encode_conversation(tokenizer, row["messages"], max_length)
        except Exception:  # a row this template rejects is skipped and counted, as in finetune.py
            ex = None
        if ex is None:
            skipped += 1
        else:
            encoded.append(ex)
    if not encoded:
        raise DataError("no held-out row has an assistant token after the chat template; accepted: "
                        "conversations that end with an assistant turn")
    encoded.sort(key=lambda e: len(e["input_ids"]))
    device = next(model.parameters()).device
    total_nll, n_tokens, i = 0.0, 0, 0
    with torch.inference_mode():
        while i < len(encoded):
            # Rows of similar length together, at most batch_tokens padded tokens per forward pass.
            j = i + 1
            while j < len(encoded) and len(encoded[j]["input_ids"]) * (j + 1 - i) <= batch_tokens:
                j += 1
            batch = encoded[i:j]
            width = max(len(e["input_ids"]) for e in batch)
            pad = lambda seq, v: seq + [v] * (width - len(seq))  # noqa: E731
            ids = torch.tensor([pad(e["input_ids"], 0) for e in batch], device=device)
            mask = torch.tensor([pad(e["attention_mask"], 0) for e in batch], device=device)
            labels = torch.tensor([pad(e["labels"], IGNORE_INDEX) for e in batch], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shifted = labels[:, 1:]
            total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum").item()
            n_tokens += int((shifted != IGNORE_INDEX).sum())
            i = j
    loss = total_nll / n_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n_tokens, "rows": len(encoded),
            "skipped_rows": skipped}
