"""Model card and upload of a finished run to the Hugging Face Hub (token from HF_TOKEN, never printed).

Repo layout: the merged model and tokenizer at the root (so `CHATBOT_MODEL=USER/NAME` loads it with
transformers), the GGUF files at the root too (`CHATBOT_GGUF_FILE=*q4_k_m.gguf`), the LoRA adapter under
`adapter/`, run records (summary, plots, data report, recipe) under `run/`, checkpoints under `checkpoints/`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

RUN_FILES = ("summary.json", "loss.png", "data_report.json", "data_lengths.png", "config.yaml")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def upload_plan(out_dir: str | Path, include_checkpoints: bool = False) -> list[tuple[Path, str]]:
    """Every (local file, path in the Hub repo) a push uploads, in order."""
    out = Path(out_dir)
    plan: list[tuple[Path, str]] = []

    def add_tree(local: Path, remote_prefix: str) -> None:
        if local.is_dir():
            for f in sorted(p for p in local.rglob("*") if p.is_file()):
                plan.append((f, remote_prefix + f.relative_to(local).as_posix()))

    add_tree(out / "merged", "")
    for f in sorted((out / "gguf").glob("*.gguf")) if (out / "gguf").is_dir() else []:
        plan.append((f, f.name))
    add_tree(out / "adapter", "adapter/")
    for name in RUN_FILES:
        if (out / name).is_file():
            plan.append((out / name, f"run/{name}"))
    if include_checkpoints:
        for ckpt in sorted(out.glob("checkpoint-*")):
            add_tree(ckpt, f"checkpoints/{ckpt.name}/")
    if (out / "README.md").is_file():
        plan.append((out / "README.md", "README.md"))
    return plan


def _gguf_pattern(summary: dict) -> str | None:
    files = summary.get("gguf_files") or []
    preferred = [f for f in files if "q4_k_m" in f.lower()] or files
    if not preferred:
        return None
    name = preferred[0]
    quant = next((q for q in ("q4_k_m", "q4_0", "q4_1", "q5_k_m", "q8_0", "f16", "bf16") if q in name.lower()), None)
    return f"*{quant}.gguf" if quant else name


def model_card(cfg, summary: dict, data_report: dict | None = None) -> str:
    """README.md for the run: base model, data and filters, hyperparameters, eval loss, how to serve it."""
    repo = cfg.hub.push_to_hub or "USER/NAME"
    data = cfg.data
    t, lora = cfg.train, cfg.lora
    base = cfg.model.name_or_path
    if base == "embedded":
        base = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Space's embedded GGUF is this model
    gguf = _gguf_pattern(summary)
    datasets = [s.path for s in data.sources if not Path(s.path).exists()]  # Hub ids go in the metadata
    meta: dict[str, Any] = {"base_model": base, "library_name": "transformers",
                            "tags": ["lora", "qlora" if summary.get("mode") == "qlora" else "peft", "chat"],
                            "pipeline_tag": "text-generation"}
    if datasets:
        meta["datasets"] = datasets
    eval_loss = summary.get("final_eval_loss")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {repo.split('/')[-1]}", "",
             f"A LoRA fine-tune of [{base}](https://huggingface.co/{base}) made with `training/finetune.py`; "
             "the adapter is merged into the full-precision base and saved in "
             f"{cfg.export.merged_dtype}.", "",
             "## Use it in the chatbot Space", "",
             "Set these variables on the Space (Settings -> Variables):", "", "```"]
    if gguf:
        lines += [f"CHATBOT_MODEL={repo}", f"CHATBOT_GGUF_FILE={gguf}"]
    else:
        lines += [f"CHATBOT_MODEL={repo}", "CHATBOT_BACKEND=transformers"]
    lines += ["```", "", "## Data", ""]
    for s in data.sources:
        extra = ", ".join(f"{k}={v}" for k, v in (("format", s.format), ("subset", s.subset), ("split", s.split),
                                                   ("weight", s.weight), ("max_rows", s.max_rows)) if v is not None)
        lines.append(f"- `{s.path}` ({extra})")
    filters = {"exact dedup": data.dedup, "near-dedup Jaccard": data.near_dedup, "min score": data.min_score,
               "min tokens": data.min_tokens, "max tokens": data.max_tokens, "max rows": data.max_rows,
               "validation": data.validation_path or f"{data.validation_fraction:.0%} seeded split (seed {data.seed})"}
    lines.append("")
    lines.append("Filters: " + "; ".join(f"{k}: {v}" for k, v in filters.items() if v not in (None, False)))
    if data_report:
        counts = {k: v for k, v in data_report.items() if isinstance(v, (int, float, str))}
        if counts:
            lines.append("")
            lines.append("Data report: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    lines += ["", "## Training", "",
              "| setting | value |", "|---|---|",
              f"| mode | {summary.get('mode')} |",
              f"| LoRA | r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets={', '.join(lora.target_modules)} |",
              f"| learning rate | {t.learning_rate} ({t.lr_scheduler_type}, warmup {t.warmup_ratio}) |",
              f"| batch | {t.per_device_train_batch_size} x grad-accum {t.gradient_accumulation_steps} |",
              f"| epochs / max steps | {t.num_train_epochs} / {t.max_steps} |",
              f"| max length | {t.max_length} |",
              f"| optimizer | {t.optim} |",
              f"| steps | {summary.get('steps')} |",
              f"| final train loss | {_fmt(summary.get('final_train_loss'))} |",
              f"| final eval loss | {_fmt(eval_loss)} |",
              f"| tokens/s | {_fmt(summary.get('tokens_per_second'), 0)} |",
              f"| peak memory | {_fmt(summary.get('peak_memory_gb'), 2)} GB |",
              f"| wall time | {_fmt(summary.get('wall_time_s'), 0)} s |",
              "", "Files: merged model at the root, GGUF at the root, LoRA adapter in `adapter/`, "
              "loss curve, summary and data report in `run/`.", ""]
    return "\n".join(lines)


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def push_run(out_dir: str | Path, repo_id: str, private: bool = False, include_checkpoints: bool = False) -> str:
    """Upload the run (see upload_plan) in one commit; returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    plan = upload_plan(out_dir, include_checkpoints)
    if not plan:
        raise ValueError(f"nothing to upload in {out_dir}")
    api = HfApi(token=_token())
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.create_commit(repo_id, operations=[CommitOperationAdd(path_in_repo=remote, path_or_fileobj=str(local))
                                           for local, remote in plan],
                      commit_message=f"Upload fine-tuned model ({len(plan)} files)")
    return str(url)


def _checkpoint_pusher_base():
    from transformers import TrainerCallback

    return TrainerCallback


class CheckpointPusher(_checkpoint_pusher_base()):
    """Uploads each checkpoint in the background as Trainer saves it, so a lost machine loses one interval."""

    def __init__(self, repo_id: str, private: bool = False):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.api = HfApi(token=_token())
        self.api.create_repo(repo_id, private=private, exist_ok=True)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            self.api.upload_folder(repo_id=self.repo_id, folder_path=str(ckpt),
                                   path_in_repo=f"checkpoints/{ckpt.name}", run_as_future=True,
                                   commit_message=f"checkpoint {state.global_step}")
