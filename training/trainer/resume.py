"""Where `--resume` continues from, checked against the recipe before anything is written.

The newest complete checkpoint wins: `train.output_dir/checkpoint-N`, or, on a fresh machine (Colab after a
disconnect, a replacement spot instance), the newest `checkpoints/checkpoint-N` of the run's Hub repo
(`hub.push_to_hub`, pushed by `--push-checkpoints`), downloaded into the Hugging Face cache. Trainer then resumes
from it exactly as from a local one (weights, optimizer, scheduler, RNG, data position).

A checkpoint is resumed only by the recipe that trained it. Its identity is what fixes the model being trained -
base, LoRA rank, alpha and target modules, mode (as resolved on the machine: auto is qlora on a GPU, fp32 on CPU),
objective and DPO/KTO beta, the chat template (which fixes the token ids that are added and trained) - and what
fixes the data order resumed into: max_length, packing, batch size and gradient accumulation (Trainer skips
`step x batch x accumulation` rows; other values would resume into other rows). A difference is refused with one
line naming it (ConfigError: exit 2) before anything is written: the recipe's values before anything loads, the
chat template right after the tokenizer is prepared. Each checkpoint carries a small run record in its
trainer_state.json (that identity and the interruptions so far), which is how later resumes and summary.json know
them. Checkpoints from before a value was recorded are not checked for it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from training.config import ConfigError, TrainConfig

LOCAL = "local"


@dataclass
class ResumePoint:
    path: Path          # the checkpoint folder Trainer resumes from
    step: int
    source: str         # "local" or the Hub repo id it was downloaded from
    earlier: list[dict] = field(default_factory=list)  # interruptions recorded before this one

    @property
    def where(self) -> str:
        return "output_dir" if self.source == LOCAL else f"the Hub repo {self.source}"


CHAT_TEMPLATE = "chat_template"   # identity keys known only once the tokenizer is prepared
NEW_TOKENS = "new_token_ids"


def recipe_identity(cfg: TrainConfig, tokenizer=None, new_token_ids=None) -> dict:
    """What a checkpoint must share with the recipe to be resumed by it (see the module docstring). With the
    prepared tokenizer, also the chat template it renders with (a sha256 prefix) and the token ids it added."""
    from training.trainer.modeling import resolve_mode

    t = cfg.train
    identity = {"model.name_or_path": cfg.model.name_or_path, "model.gguf_file": cfg.model.gguf_file,
                "lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha,
                "lora.target_modules": sorted(cfg.lora.target_modules),
                "model.mode": resolve_mode(cfg.model.mode), "train.objective": t.objective}
    if t.objective != "sft":
        identity["train.beta"] = t.beta
    identity.update({"train.max_length": t.max_length, "train.packing": t.packing,
                     "train.per_device_train_batch_size": t.per_device_train_batch_size,
                     "train.gradient_accumulation_steps": t.gradient_accumulation_steps})
    if tokenizer is not None:
        identity[CHAT_TEMPLATE] = hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:12]
        identity[NEW_TOKENS] = sorted(new_token_ids or [])
    return identity


def newest_local_checkpoint(out: Path, log: Callable[[str], None] = print) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete checkpoint-N in `out`. A folder without trainer_state.json (which
    Trainer writes last) was cut off mid-save and is skipped."""
    found = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*")
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for step, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return step, path
        log(f"{path.name} is incomplete (cut off while saving); skipping it")
    return None


def run_record(checkpoint: Path) -> dict:
    """The RunRecord a checkpoint carries ({} for checkpoints written before runs recorded one)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    record = state.get("stateful_callbacks", {}).get(RunRecord.__name__) or {}
    return record.get("args", {})


def _hub_newest(repo_id: str, log) -> int | None:
    """Newest checkpoint step in the repo; None when it has none or does not exist."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    from training.export.hub import hf_token, hub_checkpoint_steps

    try:
        steps = hub_checkpoint_steps(HfApi(token=hf_token()), repo_id)
    except RepositoryNotFoundError:
        log(f"--resume: the Hub repo {repo_id} does not exist (or HF_TOKEN cannot read it)")
        return None
    return steps[-1] if steps else None


def _download(repo_id: str, step: int, patterns: list[str]) -> Path:
    from huggingface_hub import HfApi

    from training.export.hub import CHECKPOINT_DIR, hf_token

    prefix = f"{CHECKPOINT_DIR}/checkpoint-{step}/"
    snapshot = HfApi(token=hf_token()).snapshot_download(repo_id, allow_patterns=[prefix + p for p in patterns])
    return Path(snapshot) / prefix


def find_resume_point(cfg: TrainConfig, log: Callable[[str], None] = print) -> ResumePoint | None:
    """The checkpoint `--resume` continues from (None: start fresh), after checking it matches the recipe."""
    out = Path(cfg.train.output_dir)
    local = newest_local_checkpoint(out, log) if out.is_dir() else None
    repo = cfg.hub.push_to_hub
    hub_step = None
    if repo:
        try:
            hub_step = _hub_newest(repo, log)
        except Exception as exc:  # no network, bad token, Hub down
            if local is None:
                raise ConfigError(f"--resume: cannot list the checkpoints of the Hub repo {repo} "
                                  f"({type(exc).__name__}: {exc}); check the network and HF_TOKEN, "
                                  "or drop --resume to start over") from None
            log(f"--resume: cannot reach the Hub repo {repo} ({type(exc).__name__}); using output_dir")
    if local is None and hub_step is None:
        log(f"--resume: no checkpoint in {out}" + (f" nor in the Hub repo {repo}" if repo else "")
            + "; starting fresh")
        return None
    if local is not None and (hub_step is None or local[0] >= hub_step):
        point = ResumePoint(local[1], local[0], LOCAL)
    else:
        # Small files first: a checkpoint that does not fit the recipe is refused before the large download.
        check_matches(ResumePoint(_download(repo, hub_step, ["trainer_state.json", "adapter_config.json"]),
                                  hub_step, repo), cfg)
        point = ResumePoint(_download(repo, hub_step, ["*"]), hub_step, repo)
    check_matches(point, cfg)
    point.earlier = list(run_record(point.path).get("interruptions", []))
    log(f"resuming from checkpoint-{point.step} (step {point.step}) from {point.where}: {point.path}")
    return point


def check_matches(point: ResumePoint, cfg: TrainConfig, identity: dict | None = None) -> None:
    """ConfigError naming the first difference between the checkpoint and the recipe (`identity`: the recipe's,
    default recipe_identity(cfg))."""
    name = f"checkpoint-{point.step} in {point.where}"
    hint = "resume with the recipe it was trained with, or use another train.output_dir" + \
        (" and hub.push_to_hub" if cfg.hub.push_to_hub else "")
    want = recipe_identity(cfg) if identity is None else identity
    recorded = run_record(point.path).get("recipe") or {}
    for key, value in recorded.items():
        if key not in want or want[key] == value:
            continue
        if key in (CHAT_TEMPLATE, NEW_TOKENS):
            what = "chat template" if key == CHAT_TEMPLATE else "set of tokens added by the chat template"
            raise ConfigError(f"{name} was trained with another {what} than this recipe's model.chat_template="
                              f"{cfg.model.chat_template} gives ({key} {_show(value)} there, {_show(want[key])} "
                              f"here; it fixes the trainable token ids); {hint}")
        ours = _show(want[key])
        if key == "model.mode" and cfg.model.mode != want[key]:
            ours = f"{cfg.model.mode} ({want[key]} on this machine)"
        raise ConfigError(f"{name} was trained with {key}={_show(value)} but the recipe has {key}={ours}; {hint}")
    adapter_file = point.path / "adapter_config.json"
    if not adapter_file.is_file():
        return
    adapter = json.loads(adapter_file.read_text())
    targets = set(adapter.get("target_modules") or [])
    checks = [("lora.r", adapter.get("r"), cfg.lora.r), ("lora.alpha", adapter.get("lora_alpha"), cfg.lora.alpha)]
    if "all-linear" not in cfg.lora.target_modules:  # peft stores all-linear expanded to the model's layer names
        checks.append(("lora.target_modules", sorted(targets), sorted(cfg.lora.target_modules)))
    for key, theirs, ours in checks:
        if theirs is not None and theirs != ours:
            raise ConfigError(f"{name} was trained with {key}={_show(theirs)} but the recipe has "
                              f"{key}={_show(ours)}; {hint}")


def mean_train_loss(history: list[dict]) -> float | None:
    """A resumed run's mean train loss, from its whole logged history (restored from the checkpoint): each logged
    loss weighted by the steps it covers. Trainer's own `training_loss` sums only the steps of the last session and
    divides by all of them (0.0 for a --resume that only writes the outputs of a finished run)."""
    total, last = 0.0, 0
    for h in history:
        if "loss" in h and h["step"] > last:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    return total / last if last else None


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


class RunRecord(TrainerCallback, ExportableState):
    """Stored by Trainer in every checkpoint's trainer_state.json: the recipe identity and the interruptions
    (step, where the run resumed from) so far, this run's resume included."""

    def __init__(self, recipe: dict | None = None, interruptions: list[dict] | None = None):
        self.recipe = recipe or {}
        self.interruptions = list(interruptions or [])

    @classmethod
    def for_run(cls, identity: dict, point: ResumePoint | None) -> "RunRecord":
        now = [] if point is None else [{"step": point.step, "checkpoint": f"checkpoint-{point.step}",
                                         "from": point.source}]
        return cls(identity, (point.earlier if point else []) + now)

    def state(self) -> dict:
        return {"args": {"recipe": self.recipe, "interruptions": self.interruptions}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        # A checkpoint from before runs carried this record has no slot for it; Trainer's save expects one.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
