"""Padding-free packing for the training step (whether a device packs, and with which attention, is
training.trainer.hardware's decision).

Packing = TRL's best-fit-decreasing `pack_dataset` groups tokenised conversations into rows of at most
`max_length` tokens (it records each row's `seq_lengths`); the collator splits those rows back into
conversations and hands them to transformers' `DataCollatorWithFlattening`, which concatenates a batch into
one [1, N] sequence with position_ids restarting at 0 per conversation and no attention_mask. From those
position_ids transformers builds a block-diagonal causal mask (sdpa / eager / flex, CPU and CUDA) or calls
flash-attention's varlen kernel (flash_attention_2/3), so no token attends across a conversation boundary,
and the first label of each conversation is -100 so no loss crosses it either.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence


def pack_rows(rows: Sequence[dict], max_length: int):
    """Tokenised rows (input_ids, attention_mask, labels) -> a datasets.Dataset of packed rows with
    `seq_lengths`; a row longer than max_length is cut (chat_format already cut it to train.max_length)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length!r}")
    columns = ("input_ids", "attention_mask", "labels")
    return pack_dataset(Dataset.from_list([{k: r[k] for k in columns} for r in rows]), max_length, strategy="bfd")


def unpack_features(features: Sequence[dict]) -> list[dict]:
    """Packed rows (with seq_lengths) -> the conversations inside them; unpacked rows pass through."""
    out = []
    for f in features:
        lengths = f.get("seq_lengths")
        if lengths is None:
            out.append(f)
            continue
        start = 0
        for n in (lengths.tolist() if hasattr(lengths, "tolist") else lengths):
            out.append({k: f[k][start:start + n] for k in ("input_ids", "labels")})
            start += n
    return out


def make_packing_collator(flash_attn_kwargs: bool = False) -> Callable[[Sequence[dict]], dict[str, Any]]:
    """Collator for packed (or plain) rows: one flattened [1, N] batch with per-conversation position_ids.
    `flash_attn_kwargs` also returns cu_seq_lens (saves flash-attention a device sync per layer)."""
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=flash_attn_kwargs)

    def collate(features: Sequence[dict]) -> dict[str, Any]:
        return flatten(unpack_features(features))

    return collate
