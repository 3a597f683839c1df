"""Say the plan before the first step, then how long the run takes: a first estimate from step 1 (an upper
bound: it includes compilation, allocator and cache warm-up) and a measured one after the warm-up steps.
tqdm's bar stays; these are the few lines a user reads at minute 2 to know whether the run takes 1 h or 12 h.
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from transformers import TrainerCallback

from training.trainer.hardware import Plan


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(plan: Plan) -> list[str]:
    """The hardware plan in words, one line per decision, each with its reason."""
    r = plan.reasons
    weights = {"qlora": f"4-bit nf4 base (double quant), matmuls in {plan.bnb_compute_dtype}",
               "lora": f"16-bit base ({plan.weights_dtype})", "fp32": "fp32 base"}[plan.mode]
    autocast = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + loss scaling", "fp32": "no autocast"}
    return [f"device     {plan.device}",
            f"weights    {plan.mode}: {weights}; LoRA in {plan.trainable_dtype} ({r['mode']})",
            f"precision  {plan.precision}: {autocast[plan.precision]}" + (", TF32 matmuls" if plan.tf32 else "")
            + f" ({r['precision']})",
            f"attention  {plan.attention} ({r['attention']})",
            f"packing    {'on' if plan.packing else 'off'}: {r['packing']}",
            f"liger      {'on' if plan.liger else 'off'}: {r['liger']}",
            f"optimizer  {plan.optim} ({r['optim']})"]


class RunForecast(TrainerCallback):
    """Logs the plan, data and step counts at train begin, then epoch/run time estimates: after step 1 and after
    `warmup_steps` more steps (measured between on_step_begin and on_step_end, so evals and saves are excluded)."""

    def __init__(self, plan: Plan, examples: int, tokens: int, log: Callable[[str], None] = print,
                 warmup_steps: int = 5, clock: Callable[[], float] = time.perf_counter):
        self.plan, self.examples, self.tokens, self.log = plan, examples, tokens, log
        self.warmup_steps, self.clock = warmup_steps, clock
        self.step_times: list[float] = []
        self.estimates: list[dict] = []   # what was said: {"after_steps", "s_per_step", "epoch_s", "run_s"}
        self._began: float | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps) if train_dataloader else None
        self.steps_per_epoch = per_epoch or state.max_steps
        self.remaining = max(0, state.max_steps - state.global_step)
        if not state.is_world_process_zero:
            return
        for line in plan_lines(self.plan):
            self.log(f"plan: {line}")
        if self.tokens:
            mean = self.tokens / self.examples if self.examples else 0
            self.log(f"plan: data       {self.examples:,} examples, {self.tokens:,} tokens (mean {mean:.0f} per example)")
        else:  # dpo/kto rows are tokenised later, by TRL's trainer
            self.log(f"plan: data       {self.examples:,} examples")
        epochs = state.max_steps / self.steps_per_epoch if self.steps_per_epoch else 0
        done = f", {state.global_step} already done" if state.global_step else ""
        self.log(f"plan: steps      {state.max_steps:,} optimizer steps = {epochs:.2f} epochs of "
                 f"{self.steps_per_epoch:,} (batch {args.per_device_train_batch_size} x accumulation "
                 f"{args.gradient_accumulation_steps} x {args.world_size} process{'es' if args.world_size > 1 else ''})"
                 f"{done}")
        first = state.global_step + 1
        self.log(f"plan: time       first estimate after step {first}, measured after step {first + self._warmup()}")

    def _warmup(self) -> int:
        return max(0, min(self.warmup_steps, self.remaining - 1))

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self._began is None:
            return
        self.step_times.append(self.clock() - self._began)
        self._began = None
        n, step = len(self.step_times), state.global_step
        if n == 1:
            self._estimate(state, self.step_times[0], f"step {step} took {{:.2f}} s (with warm-up): epoch <= {{}}, "
                                                      "run <= {}")
        elif n == 1 + self._warmup():
            per_step = sum(self.step_times[1:]) / (n - 1)
            self._estimate(state, per_step, f"{{:.2f}} s/step over steps {step - n + 2}-{step}: epoch ~ {{}}, "
                                             "run ~ {}, ends ~ {} UTC (training steps only; evals add)")

    def _estimate(self, state, per_step: float, text: str) -> None:
        epoch_s, run_s = per_step * self.steps_per_epoch, per_step * self.remaining
        left = per_step * max(0, self.remaining - len(self.step_times))
        self.estimates.append({"after_steps": len(self.step_times), "s_per_step": per_step, "epoch_s": epoch_s,
                               "run_s": run_s})
        if state.is_world_process_zero:
            ends = (datetime.now(timezone.utc) + timedelta(seconds=left)).strftime("%H:%M")
            self.log("time: " + text.format(per_step, duration(epoch_s), duration(run_s), ends))
