"""Model card and upload of a finished run to the Hugging Face Hub (token from HF_TOKEN, never printed).

Repo layout: the merged model and tokenizer at the root (so `CHATBOT_MODEL=USER/NAME` loads it with
transformers), the GGUF files at the root too (`CHATBOT_GGUF_FILE=*q4_k_m.gguf`), the LoRA adapter under
`adapter/`, run records (summary, plots, data report, recipe) under `run/`, checkpoints under `checkpoints/`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import yaml

RUN_FILES = ("summary.json", "loss.png", "data_report.json", "data_lengths.png", "config.yaml")
# What a loader picks up from a repo's root (weights, shard indexes, GGUF files) and the adapter folder: a push
# deletes those an earlier push left and this one does not replace (a stale single model.safetensors would be
# loaded instead of a new sharded index).
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.gguf", "*.pt", "*.pth")


def hf_token() -> str | None:
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
    for f in run_gguf_files(out):
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


def run_gguf_files(out: Path) -> list[Path]:
    """The GGUF files this run exported (summary.json's gguf_files), not those an earlier run left in OUT/gguf;
    every *.gguf there when the summary does not say."""
    found = sorted((out / "gguf").glob("*.gguf")) if (out / "gguf").is_dir() else []
    try:
        names = json.loads((out / "summary.json").read_text())["gguf_files"]
    except (OSError, ValueError, KeyError, TypeError):
        return found
    return [f for f in found if f.name in set(names)]


def stale_remote_files(remote: list[str], plan: list[tuple[Path, str]]) -> list[str]:
    """Model files in the repo (root weights / GGUF, adapter/) that the upload `plan` does not replace."""
    current = {path for _, path in plan}
    return sorted(f for f in remote if f not in current and (
        f.startswith("adapter/") or ("/" not in f and any(fnmatch.fnmatch(f, p) for p in MODEL_FILES))))


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
        from chatbot.model_files import EMBEDDED_REPO_ID

        base = EMBEDDED_REPO_ID  # the Space's embedded GGUF is this model
    gguf = _gguf_pattern(summary)
    datasets = [s.path for s in data.sources if not Path(s.path).exists()]  # Hub ids go in the metadata
    meta: dict[str, Any] = {"base_model": base, "library_name": "transformers",
                            "tags": ["lora", "qlora" if summary.get("mode") == "qlora" else "peft", "chat"]
                            + ([t.objective] if t.objective != "sft" else []),
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
              f"| objective | {t.objective}" + (f" (beta {t.beta})" if t.objective != "sft" else "") + " |",
              *([f"| hardware | {_plan_words(summary['plan'])} |"] if summary.get("plan") else []),
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
              *([f"| interruptions | {_interruptions(summary['interruptions'])} |"]
                if summary.get("interruptions") else []),
              "", "Files: merged model at the root, GGUF at the root, LoRA adapter in `adapter/`, "
              "loss curve, summary and data report in `run/`.", ""]
    return "\n".join(lines)


def _interruptions(resumes: list[dict]) -> str:
    """summary["interruptions"] as words: where each resume continued from."""
    return "; ".join(f"resumed at step {r['step']} from "
                     + ("output_dir" if r["from"] == "local" else f"the Hub repo {r['from']}") for r in resumes)


def _plan_words(plan: dict) -> str:
    """summary["plan"] (training.trainer.hardware.Plan) as one table cell."""
    return (f"{plan['device']}: {plan['mode']}, {plan['precision']}, attention {plan['attention']}, "
            f"packing {'on' if plan['packing'] else 'off'}, Liger {'on' if plan['liger'] else 'off'}, {plan['optim']}")


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def push_run(out_dir: str | Path, repo_id: str, private: bool = False, include_checkpoints: bool = False) -> str:
    """Upload the run (see upload_plan) in one commit that also deletes the model files an earlier push left and this
    one does not replace (stale_remote_files); run records and checkpoints stay. Returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    plan = upload_plan(out_dir, include_checkpoints)
    if not plan:
        raise ValueError(f"nothing to upload in {out_dir}")
    api = HfApi(token=hf_token())
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    stale = stale_remote_files(api.list_repo_files(repo_id), plan)
    api.create_commit(repo_id, operations=[CommitOperationAdd(path_in_repo=remote, path_or_fileobj=str(local))
                                           for local, remote in plan]
                      + [CommitOperationDelete(path_in_repo=f) for f in stale],
                      commit_message=f"Upload fine-tuned model ({len(plan)} files"
                                     + (f", {len(stale)} stale removed)" if stale else ")"))
    return str(url)


CHECKPOINT_DIR = "checkpoints"  # checkpoint-N folders sit under this folder of the repo


def hub_checkpoint_steps(api, repo_id: str) -> list[int]:
    """Steps of the complete checkpoints in the repo (those with trainer_state.json, which Trainer writes last),
    oldest first."""
    pattern = re.compile(rf"^{CHECKPOINT_DIR}/checkpoint-(\d+)/trainer_state\.json$")
    return sorted(int(m.group(1)) for f in api.list_repo_files(repo_id) if (m := pattern.match(f)))


def _checkpoint_pusher_base():
    from transformers import TrainerCallback

    return TrainerCallback


class CheckpointPusher(_checkpoint_pusher_base()):
    """Uploads each checkpoint in the background as Trainer saves it, so a lost machine loses one interval.

    on_save hard-links the finished checkpoint folder into OUT/.hub-push/ (instant; rotation by save_total_limit
    cannot then delete files from under an upload) and hands it to one worker thread, so training never waits.
    While an upload runs, only the newest waiting checkpoint is kept: a slow link pushes fewer checkpoints, never
    stale ones. Each push is one commit that adds checkpoints/checkpoint-N/ and removes the repo's checkpoints
    beyond `keep` (save_total_limit) and any newer than N (left by an earlier run this one replaced). Transfers
    are retried by huggingface_hub (http_backoff on 429/5xx and connection errors); a push that still fails is
    logged and training goes on. At the end of training the last push is awaited for at most `wait_s` seconds.
    """

    def __init__(self, repo_id: str, private: bool = False, keep: int | None = None, wait_s: float = 300,
                 log=print):
        from huggingface_hub import HfApi

        self.repo_id, self.keep, self.wait_s, self.log = repo_id, keep, wait_s, log
        self.api = HfApi(token=hf_token())
        self.api.create_repo(repo_id, private=private, exist_ok=True)
        self.pushed: list[int] = []                 # steps pushed, in order
        self.failed: list[tuple[int, str]] = []     # (step, error) of pushes that failed
        self._waiting: tuple[int, Path] | None = None
        self._busy: int | None = None
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or state.global_step > 0:  # resumed: the repo's checkpoints are ours
            return
        shutil.rmtree(Path(args.output_dir) / ".hub-push", ignore_errors=True)  # left by a killed run
        try:
            earlier = hub_checkpoint_steps(self.api, self.repo_id)
        except Exception:  # only a warning depends on it
            return
        if earlier:
            self.log(f"the Hub repo {self.repo_id} holds checkpoint-{earlier[-1]} of an earlier run; this run starts "
                     "over and its first checkpoint push removes it (stop now and add --resume to continue it)")

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (ckpt / "trainer_state.json").is_file():
            return
        staged = _stage(ckpt, Path(args.output_dir) / ".hub-push" / ckpt.name)
        with self._cond:
            if self._waiting:
                shutil.rmtree(self._waiting[1], ignore_errors=True)
            self._waiting = (state.global_step, staged)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="checkpoint-push", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None:
                    self._cond.wait()
                (step, staged), self._waiting = self._waiting, None
                self._busy = step
            try:
                removed = self._push(step, staged)
                self.pushed.append(step)
                self.log(f"pushed checkpoint-{step} to {self.repo_id}"
                         + (f" (removed {', '.join(removed)})" if removed else ""))
            except Exception as exc:  # not fatal: the next checkpoint is pushed all the same
                self.failed.append((step, f"{type(exc).__name__}: {exc}"))
                self.log(f"push of checkpoint-{step} to {self.repo_id} failed ({type(exc).__name__}: {exc}); "
                         "training goes on")
            finally:
                shutil.rmtree(staged, ignore_errors=True)
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _push(self, step: int, staged: Path) -> list[str]:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        remote = [s for s in hub_checkpoint_steps(self.api, self.repo_id) if s != step]
        older = [s for s in remote if s < step]
        drop = [s for s in remote if s > step] + (older[:max(0, len(older) - self.keep + 1)] if self.keep else [])
        ops = [CommitOperationAdd(path_in_repo=f"{CHECKPOINT_DIR}/checkpoint-{step}/{f.relative_to(staged).as_posix()}",
                                  path_or_fileobj=str(f))
               for f in sorted(staged.rglob("*")) if f.is_file()]
        ops += [CommitOperationDelete(path_in_repo=f"{CHECKPOINT_DIR}/checkpoint-{s}/", is_folder=True)
                for s in sorted(drop)]
        self.api.create_commit(self.repo_id, operations=ops, commit_message=f"checkpoint {step}")
        return [f"checkpoint-{s}" for s in sorted(drop)]

    def wait(self, timeout: float) -> bool:
        """Block until every saved checkpoint is pushed (or failed), at most `timeout` seconds."""
        with self._cond:
            pending = self._waiting[0] if self._waiting else self._busy
            if pending is None:
                return True
            self.log(f"waiting up to {timeout:g} s for the push of checkpoint-{pending} to {self.repo_id}")
            done = self._cond.wait_for(lambda: self._waiting is None and self._busy is None, timeout)
        if not done:
            self.log(f"checkpoint push still running after {timeout:g} s; not waiting longer "
                     f"(the repo keeps checkpoint-{self.pushed[-1]})" if self.pushed else
                     f"checkpoint push still running after {timeout:g} s; not waiting longer")
        return done

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.wait(self.wait_s)


def _stage(ckpt: Path, staged: Path) -> Path:
    """A hard-linked copy of a finished checkpoint folder (a plain copy where links are not supported)."""
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(ckpt, staged, copy_function=_link_or_copy)
    return staged


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # e.g. a Google Drive mount in Colab
        shutil.copy2(src, dst)
