"""Preference tuning for finetune.py's `train.objective: dpo | kto`: TRL's DPOTrainer / KTOTrainer in place of Trainer.

Everything else is finetune.py's: the same model with its LoRA (4-bit / bf16 / fp32), the same tokenizer and chat
template (TRL renders prompt and prompt + reply with `apply_chat_template` in its conversational format, so the
prompt tokens are the ones the Space feeds the model), the same TrainingArguments (copied field by field into
DPOConfig / KTOConfig), then the same adapter, merge, GGUF export and model card. The trainable weights keep the
dtype the plan gave them (fp32): TRL casts them to bf16 when the base is 4-bit, and `build_preference_trainer` puts
them back. The reference model is the base:
TRL keeps a frozen copy of the freshly initialised adapter ("ref", a no-op since LoRA's B starts at zero), which
`drop_reference_adapter` removes before the adapter is saved.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence


def trainer_config(objective: str, args, max_length: int, beta: float):
    """DPOConfig / KTOConfig carrying every TrainingArguments value finetune.py chose, plus the objective's own."""
    from transformers import TrainingArguments
    from trl import DPOConfig, KTOConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values.update(
        max_length=max_length, beta=beta,
        gradient_checkpointing=False,      # finetune.py already set it on the model (model.gradient_checkpointing)
        remove_unused_columns=True,        # TRL keeps exactly the tokenised columns its collator reads
        include_num_input_tokens_seen="no",  # TRL batches have no input_ids column to count
        bf16=bool(args.bf16), fp16=bool(args.fp16),  # TRL would default bf16 on, also on CPU
    )
    if objective == "kto":  # KTO's KL term pairs neighbours of a fixed order (the data is shuffled once, seeded)
        values["train_sampling_strategy"] = "sequential"
    cls = DPOConfig if objective == "dpo" else KTOConfig
    accepted = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in values.items() if k in accepted})


def build_preference_trainer(cfg, args, model, tokenizer, train_rows: Sequence[dict], eval_rows: Sequence[dict] = (),
                             callbacks: Sequence[Any] = ()):
    """DPOTrainer or KTOTrainer (cfg.train.objective) on rows from training.data.preference."""
    from datasets import Dataset
    from trl import DPOTrainer, KTOTrainer

    objective = cfg.train.objective
    trainer_cls = DPOTrainer if objective == "dpo" else KTOTrainer
    planned = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_cls(
        model=model,
        args=trainer_config(objective, args, cfg.train.max_length, cfg.train.beta),
        train_dataset=Dataset.from_list(list(train_rows)),
        eval_dataset=Dataset.from_list(list(eval_rows)) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    restore_dtypes(trainer.model, planned)
    return trainer


def restore_dtypes(model, dtypes: dict) -> int:
    """Parameters named in `dtypes` back in the dtype recorded there; returns how many were changed.

    TRL 1.16's DPOTrainer / KTOTrainer cast every trainable parameter of a 4-bit model to bf16 in __init__ (the
    QLoRA paper's recipe), after modeling.upcast_trainable made them fp32 for the plan: bf16 rounds away AdamW
    updates smaller than ~1/256 of a weight, and on fp16 GPUs it would be bf16 under fp16 autocast. The optimizer
    is created later, in train(), so it steps the restored fp32 weights."""
    n = 0
    for name, param in model.named_parameters():
        dtype = dtypes.get(name)
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)
            n += 1
    return n


def drop_reference_adapter(model) -> None:
    """Remove the frozen reference adapter TRL added, so OUT/adapter holds the trained adapter only."""
    if "ref" in (getattr(model, "peft_config", None) or {}):
        model.delete_adapter("ref")
        model.set_adapter("default")
