"""Fine-tune a small chat model with (Q)LoRA, from raw data to the files the Space serves; reads top to bottom.

    python training/finetune.py --config training/configs/smollm2-135m-cpu.yaml [--section.option VALUE ...]
    python training/finetune.py --config ... --resume            # continue from the newest checkpoint
    python training/finetune.py --help                           # every option with its default

Works unchanged under `accelerate launch` / `torchrun` (DDP): every rank trains, rank 0 writes the outputs.
"""
from __future__ import annotations

import gc
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.chat_format import encode_conversation, prepare_tokenizer
from training.config import TrainConfig, config_to_dict, parse_config, save_config
from training.paths import resolve_recipe_paths
from training.trainer.hardware import Plan
from training.trainer.peak_memory import peak_memory_gib
from training.trainer.signal_scope import restoring_signal_handlers
from training.plotting import headless_pyplot


def log(msg: str) -> None:
    print(f"[finetune] {msg}", flush=True)


# ---------------------------------------------------------------- data -> tensors

def tokenize_rows(rows: Sequence[dict], tokenizer, max_length: int) -> tuple[list[dict], Counter]:
    """Pre-tokenised examples (masking from chat_format) and the count of rows dropped, by reason."""
    examples, dropped = [], Counter()
    for row in rows:
        try:
            ex = encode_conversation(tokenizer, row["messages"], max_length)
        except Exception as exc:  # a row the template rejects (role order, ...) is skipped and counted
            dropped[f"template_error: {type(exc).__name__}"] += 1
            continue
        if ex is None:
            dropped["no_assistant_tokens_within_max_length"] += 1
            continue
        examples.append(ex)
    return examples, dropped


def make_collator(plan, tokenizer):
    """Padding collator (labels padded with -100); where the plan packs, padding-free batches where sequences
    are concatenated and told apart by position_ids (training.trainer.packing: no attention or loss across them)."""
    from transformers import DataCollatorForSeq2Seq

    from training.trainer.hardware import FLASH

    if plan.packing:
        from training.trainer.packing import make_packing_collator

        return make_packing_collator(flash_attn_kwargs=plan.attention in FLASH)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


# ---------------------------------------------------------------- trainer setup

def _report_to(value: str) -> list[str]:
    if value == "auto":
        import importlib.util

        return [name for name, mod in (("tensorboard", "tensorboard"), ("wandb", "wandb"))
                if importlib.util.find_spec(mod)]
    return [] if value == "none" else [v.strip() for v in value.split(",") if v.strip()]


def training_arguments(cfg: TrainConfig, plan: Plan, has_eval: bool):
    """The Trainer's arguments: the recipe's train section, precision/optimizer/Liger from the hardware plan
    (training.trainer.hardware; modeling.plan_training makes it)."""
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    eval_every = t.eval_steps if has_eval and t.eval_steps > 0 else None
    return TrainingArguments(
        output_dir=t.output_dir,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=plan.optim,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",  # with loss scaling; trainable weights are fp32 (modeling.upcast_trainable)
        tf32=True if plan.tf32 else None,
        report_to=_report_to(t.report_to),
        use_liger_kernel=plan.liger,
        dataloader_num_workers=t.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding",  # real tokens, for tokens/s
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),  # also makes torchrun on CPU a real (gloo) DDP run, as in tests
    )


def build_trainer(cfg: TrainConfig, plan: Plan, model, tokenizer, train_rows: Sequence[dict],
                  eval_rows: Sequence[dict] = (), callbacks: Sequence[Any] = ()):
    """The Trainer `run` trains with (benchmarks/bench_train.py times this same object). With `train.packing` the
    training rows are first packed into rows of at most train.max_length tokens (TRL's best-fit decreasing).
    `plan`: the hardware plan for this recipe and model (modeling.plan_training), which decides the packing."""
    from datasets import Dataset

    from training.trainer.eval_loss import PooledEvalLossTrainer  # eval loss = evaluate.py's held-out loss

    if plan.packing:
        from training.trainer.packing import pack_rows

        train_dataset = pack_rows(train_rows, cfg.train.max_length)
        log(f"packing: {len(train_rows)} examples -> {len(train_dataset)} rows of <= {cfg.train.max_length} tokens")
    else:
        train_dataset = Dataset.from_list(list(train_rows))
    return PooledEvalLossTrainer(
        model=model,
        args=training_arguments(cfg, plan, has_eval=bool(eval_rows)),
        train_dataset=train_dataset,
        eval_dataset=Dataset.from_list(list(eval_rows)) if eval_rows else None,
        data_collator=make_collator(plan, tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


# ---------------------------------------------------------------- outputs

def plot_losses(summary: dict, path: Path) -> Path:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("eval_loss", "eval")):
        points = summary[key]
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker="." if key == "eval_loss"
                    else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(summary["config"]["train"]["output_dir"]).name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_gguf_step(cfg: TrainConfig, merged_dir: Path, out: Path) -> list[Path]:
    """GGUF files from the merged model; an unsupported architecture is reported, not fatal."""
    if not cfg.export.gguf:
        return []
    if not cfg.export.gguf_quants:
        log("GGUF export skipped: no quant asked for (export.gguf_quants is empty)")
        return []
    try:
        from training.export.gguf import ExportError, export_gguf
    except ModuleNotFoundError as exc:
        if exc.name != "training.export.gguf":
            raise
        log("GGUF export skipped: training/export_gguf.py is not available")
        return []
    metadata = {"general.name": cfg.hub.push_to_hub or out.name, "general.base_model": cfg.model.name_or_path}
    try:
        files = export_gguf(merged_dir, out / "gguf", cfg.export.gguf_quants, metadata=metadata)
    except ExportError as exc:
        log(f"GGUF export skipped: {exc}")
        return []
    for f in files:
        log(f"wrote {f}")
    return [Path(f) for f in files]


# ---------------------------------------------------------------- the run

@restoring_signal_handlers  # the run handles SIGTERM/SIGINT (training.trainer.preemption) until it ends
def run(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> dict:
    """Train, merge, export; returns the summary (also written to OUT/summary.json)."""
    import torch
    from accelerate import PartialState
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from training.data import DataError, prepare_data
    from training.data.preference import prepare_preference_data
    from training.export.merge import merge_adapter
    from training.trainer.modeling import load_model_for_training, load_tokenizer, materialize_gguf_base, plan_training
    from training.trainer.preemption import SaveOnPreemption
    from training.trainer.preference import build_preference_trainer, drop_reference_adapter
    from training.trainer.progress import RunForecast
    from training.trainer.resume import (RunRecord, check_matches, find_resume_point, mean_train_loss,
                                         recipe_identity)

    started = time.time()
    out = Path(cfg.train.output_dir)
    resume_point = find_resume_point(cfg, log) if cfg.train.resume else None  # local or Hub; checked, nothing written

    # 1. Tokenizer with a chat template and pad != eos (so EOS stays a trained label).
    tokenizer = load_tokenizer(cfg.model)
    new_token_ids = prepare_tokenizer(tokenizer, cfg.model.chat_template)
    identity = recipe_identity(cfg, tokenizer, new_token_ids)  # what --resume must match, kept in every checkpoint
    if resume_point:
        check_matches(resume_point, cfg, identity)  # the chat template too, still before anything is written
    out.mkdir(parents=True, exist_ok=True)
    resolve_recipe_paths(cfg)
    save_config(cfg, out / "config.yaml")
    set_seed(cfg.train.seed)
    log(f"output_dir={out}")
    # The same process group Trainer will use (gloo on CPU, where a bare PartialState() sees one process).
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():  # under DDP rank 0 writes OUT/base, the others then read it
        base = materialize_gguf_base(cfg.model, out / "base", tokenizer)
    plan = plan_training(cfg, base, new_token_ids)  # training.trainer.hardware: weights, precision, attention, Liger, ...

    # 2. Data: normalised messages, cleaned, mixed and split by training.data; then masked tensors.
    #    dpo/kto: prompts with rated replies (training.data.preference), tokenised by TRL's trainer itself.
    if cfg.train.objective == "sft":
        data = prepare_data(cfg.data, tokenizer=tokenizer, log=log, max_length=cfg.train.max_length)
        train_rows, train_drop = tokenize_rows(data.train, tokenizer, cfg.train.max_length)
        eval_rows, eval_drop = tokenize_rows(data.validation, tokenizer, cfg.train.max_length)
    else:
        data = prepare_preference_data(cfg.data, cfg.train.objective, log=log)
        (train_rows, train_drop), (eval_rows, eval_drop) = (data.train, Counter()), (data.validation, Counter())
    if state.is_main_process:
        data.report.write(out)  # prepare_data has logged its summary
    for split, dropped in (("train", train_drop), ("validation", eval_drop)):
        for reason, n in sorted(dropped.items()):
            log(f"{split}: dropped {n} rows: {reason}")
    if not train_rows:
        raise DataError("no usable training examples left after tokenisation (drops above): check data.sources "
                        f"or raise train.max_length (now {cfg.train.max_length})")
    log(f"examples: train={len(train_rows)} validation={len(eval_rows)}")

    # 3. Model: the base (4-bit / bf16 / fp32) with LoRA adapters.
    model = load_model_for_training(base, cfg.model, cfg.lora, plan, tokenizer, new_token_ids)
    plan = plan.with_attention(model.config._attn_implementation)  # "default" -> what the architecture uses (sdpa)
    model.print_trainable_parameters()

    # 4. Train with transformers' Trainer (dpo/kto: TRL's DPOTrainer/KTOTrainer with the same arguments).
    tokens = sum(len(r.get("input_ids", ())) for r in train_rows)
    callbacks = list(callbacks) + [RunForecast(plan, len(train_rows), tokens, log=log)]  # says the plan, then ETAs
    if cfg.hub.push_checkpoints and cfg.hub.push_to_hub:
        from training.export.hub import CheckpointPusher

        callbacks.append(CheckpointPusher(cfg.hub.push_to_hub, private=cfg.hub.private,
                                          keep=cfg.train.save_total_limit, log=log))
    record = RunRecord.for_run(identity, resume_point)  # recipe + interruptions so far, in every checkpoint
    preemption = SaveOnPreemption(cfg.train.save_minutes, log=log,  # SIGTERM/SIGINT, train.save_minutes
                                  notice_s=cfg.train.preemption_notice_s)
    callbacks += [record, preemption]
    if cfg.train.objective == "sft":
        trainer = build_trainer(cfg, plan, model, tokenizer, train_rows, eval_rows, callbacks)
    else:
        trainer = build_preference_trainer(cfg, training_arguments(cfg, plan, has_eval=bool(eval_rows)), model,
                                           tokenizer, train_rows, eval_rows, callbacks)
    preemption.attach(trainer)  # a signal also stops an evaluation; the push after it waits within the notice
    resume_from = str(resume_point.path) if resume_point else None
    if not cfg.train.resume and (last := get_last_checkpoint(str(out))):
        log(f"{out} already has {Path(last).name}; starting over (pass --resume to continue it)")
    tokens_before = 0
    if resume_from:
        state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        tokens_before = state.get("num_input_tokens_seen", 0)
    result = trainer.train(resume_from_checkpoint=resume_from)
    preemption.exit_if_interrupted()  # a signal stopped it: the checkpoint is saved (and pushed); exit 143/130
    final_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    if eval_rows and final_eval.get("step") != trainer.state.global_step:
        final_eval = trainer.evaluate()  # the last periodic eval was before the final step
    # From here a signal lets the output being written finish, then stops (the final checkpoint has the model).
    preemption.exit_if_interrupted()
    history = list(trainer.state.log_history)  # restored from the checkpoint on resume: the whole run's curve
    trainer_world_size = trainer.args.world_size
    if not trainer.is_world_process_zero():
        return {}

    # 5. Adapter, then the merged 16-bit model (merged into a full-precision copy of the base), then GGUF.
    drop_reference_adapter(model)  # dpo/kto: TRL's frozen copy of the initial adapter
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    preemption.exit_if_interrupted()
    examples, data_report = {"train": len(train_rows), "validation": len(eval_rows)}, data.report.to_dict()
    merged_dir = None
    if cfg.export.merge:
        # The merge needs the RAM (a free Colab has ~12.7 GB): the model, trainer and tokenised rows go first.
        del trainer, model, train_rows, eval_rows, data
        gc.collect()
        torch.cuda.empty_cache()
        merged_dir = merge_adapter(base, out / "adapter", out / "merged", tokenizer, cfg.export.merged_dtype,
                                   cfg.model.trust_remote_code, log_fn=log)
        log(f"wrote {merged_dir}")
        preemption.exit_if_interrupted()
    gguf_files = export_gguf_step(cfg, merged_dir, out) if merged_dir else []
    preemption.exit_if_interrupted()

    # 6. Summary, loss plot, model card.
    train_runtime = result.metrics.get("train_runtime", 0.0)
    tokens_seen = result.metrics.get("num_input_tokens_seen") or 0
    summary = {
        "steps": result.global_step,
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "final_eval_loss": final_eval.get("eval_loss"),
        "final_train_loss": mean_train_loss(history) if resume_from else result.training_loss,
        "examples": examples,
        "dropped_at_tokenisation": {"train": dict(train_drop), "validation": dict(eval_drop)},
        "tokens_trained": tokens_seen,
        "tokens_per_second": (tokens_seen - tokens_before) / train_runtime if train_runtime else None,
        "train_runtime_s": train_runtime,
        "peak_memory_gb": round(peak_memory_gib()[0], 3),  # CUDA allocated on a GPU, else RSS
        "wall_time_s": round(time.time() - started, 1),
        "mode": plan.mode,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "plan": plan.to_dict(),  # training.trainer.hardware: what was chosen on this device, and why
        "resumed_from": Path(resume_from).name if resume_from else None,
        "interruptions": record.interruptions,  # [{step, checkpoint, from: local | Hub repo}], oldest first
        "processes": trainer_world_size,
        "gguf_files": [f.name for f in gguf_files],
        "config": config_to_dict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot_losses(summary, out / "loss.png")

    from training.export.hub import model_card, push_run

    (out / "README.md").write_text(model_card(cfg, summary, data_report))
    log(f"train loss {summary['final_train_loss']:.4f}  eval loss {summary['final_eval_loss']}  "
        f"{summary['tokens_per_second'] or 0:.0f} tokens/s  peak {summary['peak_memory_gb']:.2f} GB  "
        f"wall {summary['wall_time_s']:.0f}s")
    preemption.exit_if_interrupted()
    if cfg.hub.push_to_hub:
        url = push_run(out, cfg.hub.push_to_hub, private=cfg.hub.private)
        log(f"uploaded to {url}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from training.user_errors import USAGE_EXIT, explain

    cfg = None
    try:
        cfg = parse_config(None if argv is None else list(argv))
        run(cfg)
        return 0
    except Exception as exc:
        line = explain(exc, cfg)  # a user mistake: one line naming what to change; anything else is a bug
        if line is None:
            raise
    gc.collect()  # frees the failed run, whose progress bar then ends its line: the error line stands alone
    print(f"error: {line}", file=sys.stderr)
    return USAGE_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
