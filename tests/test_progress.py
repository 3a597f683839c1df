"""The plan is said before the first step; the epoch-time estimate comes after step 1 and is refreshed from the
measured steps after warm-up (a fake clock, so the figures are exact)."""
from __future__ import annotations

from types import SimpleNamespace

from training.trainer.hardware import Device, Request, decide
from training.trainer.progress import RunForecast, duration, plan_lines


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _drive(forecast: RunForecast, clock: FakeClock, step_seconds: list[float], state, eval_seconds: float = 0):
    for seconds in step_seconds:
        forecast.on_step_begin(None, state, None)
        clock.now += seconds
        state.global_step += 1
        forecast.on_step_end(None, state, None)
        clock.now += eval_seconds  # evals / saves between steps are not training time


def test_plan_then_first_and_measured_estimates():
    plan = decide(Device(name="Tesla T4", capability=(7, 5), memory_gib=14.7,
                         packages=frozenset({"bitsandbytes", "liger_kernel"})),
                  Request(packing=True, liger=True, optim="adamw_8bit",
                          packing_checks={"default": (True, "checked on a toy llama")}))
    lines, clock = [], FakeClock()
    forecast = RunForecast(plan, examples=1000, tokens=300_000, log=lines.append, warmup_steps=3, clock=clock)
    args = SimpleNamespace(gradient_accumulation_steps=4, per_device_train_batch_size=2, world_size=1)
    state = SimpleNamespace(max_steps=250, global_step=0, is_world_process_zero=True)
    forecast.on_train_begin(args, state, None, train_dataloader=range(500))  # 500 batches / 4 = 125 steps/epoch

    said = "\n".join(lines)
    assert "Tesla T4 (sm75, 15 GiB)" in said
    assert "precision  fp16: fp16 autocast + loss scaling" in said and "no native bf16" in said
    assert "liger      off: sm75" in said and "packing    on" in said
    assert "1,000 examples, 300,000 tokens (mean 300 per example)" in said
    assert "250 optimizer steps = 2.00 epochs of 125 (batch 2 x accumulation 4 x 1 process)" in said
    assert "first estimate after step 1, measured after step 4" in said

    _drive(forecast, clock, [9.0, 2.0, 2.0, 2.0, 2.0], state, eval_seconds=30)
    first, measured = forecast.estimates
    assert first == {"after_steps": 1, "s_per_step": 9.0, "epoch_s": 9.0 * 125, "run_s": 9.0 * 250}
    assert measured == {"after_steps": 4, "s_per_step": 2.0, "epoch_s": 250.0, "run_s": 500.0}
    time_lines = [line for line in lines if line.startswith("time: ")]
    assert time_lines[0].startswith("time: step 1 took 9.00 s (with warm-up): epoch <= 19 min, run <= 38 min")
    assert time_lines[1].startswith("time: 2.00 s/step over steps 2-4: epoch ~ 4 min, run ~ 8 min, ends ~ ")
    assert len(time_lines) == 2  # said twice, not every step (tqdm shows the rest)


def test_resumed_run_counts_remaining_steps_and_other_ranks_stay_quiet():
    plan = decide(Device(), Request())
    lines, clock = [], FakeClock()
    forecast = RunForecast(plan, examples=10, tokens=100, log=lines.append, warmup_steps=5, clock=clock)
    args = SimpleNamespace(gradient_accumulation_steps=1, per_device_train_batch_size=1, world_size=2)
    state = SimpleNamespace(max_steps=10, global_step=7, is_world_process_zero=False)
    forecast.on_train_begin(args, state, None, train_dataloader=range(5))
    _drive(forecast, clock, [1.0, 1.0, 1.0], state)
    assert lines == []
    assert forecast.estimates[0]["run_s"] == 3.0  # 3 steps left of 10
    assert forecast.estimates[-1]["after_steps"] == 3  # warm-up shortened to what is left


def test_plan_lines_cover_every_decision_and_durations_read_well():
    plan = decide(Device(name="NVIDIA H100 80GB HBM3", capability=(9, 0), memory_gib=79.1,
                         packages=frozenset({"bitsandbytes", "flash_attn", "liger_kernel"})),
                  Request(packing=True, liger=True, optim="adamw_8bit"))
    text = "\n".join(plan_lines(plan))
    for word in ("device", "weights", "precision", "attention", "packing", "liger", "optimizer"):
        assert f"\n{word} " in "\n" + text
    assert "4-bit nf4" in text and "bf16 autocast, TF32 matmuls" in text and "flash_attention_2" in text
    assert [duration(s) for s in (42, 600, 3 * 3600)] == ["42 s", "10 min", "3.0 h"]


def test_preference_rows_not_yet_tokenised_are_not_called_zero_tokens():
    lines = []
    forecast = RunForecast(decide(Device(), Request()), examples=12, tokens=0, log=lines.append, clock=FakeClock())
    args = SimpleNamespace(gradient_accumulation_steps=1, per_device_train_batch_size=2, world_size=1)
    state = SimpleNamespace(max_steps=6, global_step=0, is_world_process_zero=True)
    forecast.on_train_begin(args, state, None, train_dataloader=range(6))
    data = [line for line in lines if line.startswith("plan: data")]
    assert data == ["plan: data       12 examples"], lines
