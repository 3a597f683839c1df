"""A lost machine loses at most one checkpoint interval, and nothing when it is warned (SIGTERM / SIGINT):
--resume on a fresh machine continues from the Hub repo's newest pushed checkpoint, a signal saves the current
step, and both end with the adapter weights of an uninterrupted run. The Hub is a local folder
(tests/lost_machine_harness.py), never the network."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lost_machine_harness import StandinHub
from training.config import ConfigError, TrainConfig, apply_overrides, load_config, save_config
from training.data import SourceConfig

REPO = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).with_name("lost_machine_harness.py")
FINETUNE = REPO / "training" / "finetune.py"
MAX_STEPS = 12


def _write_jsonl(path: Path, n: int, offset: int = 0) -> Path:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell me about topic {i}."},
        {"role": "assistant", "content": f"Topic {i} is nice."}]}) + "\n" for i in range(offset, offset + n)))
    return path


def _cfg(tmp: Path, model_dir, out: str, **overrides) -> TrainConfig:
    """The tiniest real run: 16 rows, batch 4 (4 steps an epoch), fp32 LoRA on a tiny random Llama, no merge."""
    cfg = TrainConfig()
    cfg.data.sources = [SourceConfig(path=str(_write_jsonl(tmp / "train.jsonl", 16)), format="messages")]
    cfg.data.validation_path = str(_write_jsonl(tmp / "valid.jsonl", 2, offset=100))
    cfg.data.dedup = False
    base = {"model.name_or_path": str(model_dir), "model.mode": "fp32", "model.gradient_checkpointing": False,
            "lora.r": 8, "lora.alpha": 16, "train.output_dir": str(tmp / out), "train.max_length": 64,
            "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
            "train.learning_rate": 2e-3, "train.warmup_ratio": 0.0, "train.logging_steps": 1,
            "train.eval_steps": 0, "train.save_steps": 4, "train.max_steps": MAX_STEPS, "train.report_to": "none",
            "train.optim": "adamw_torch", "export.merge": False, "export.gguf": False}
    return apply_overrides(cfg, {**base, **overrides})


def _env(hub: Path, step_seconds: float = 0.0) -> dict:
    return {**os.environ, "HUB_STANDIN_DIR": str(hub), "HARNESS_STEP_SECONDS": str(step_seconds),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _finetune(recipe: Path, hub: Path, *args: str, step_seconds: float = 0.0, log: Path | None = None):
    """finetune.py under the stand-in Hub, as a child process (stdout+stderr into `log`)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, str(HARNESS), str(FINETUNE), "--config", str(recipe), *args],
                            cwd=REPO, env=_env(hub, step_seconds), stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_llama_dir) -> Path:
    tmp = tmp_path_factory.mktemp("lost-machine")
    return save_config(_cfg(tmp, tiny_llama_dir, "unused"), tmp / "recipe.yaml")


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory) -> Path:
    """The reference: the same recipe run start to finish, here (one thread, as the child processes)."""
    import torch

    from training.finetune import run

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_config(recipe, {"train.output_dir": str(out)}))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_kill_9_then_resume_on_a_fresh_machine_from_the_hub(recipe, uninterrupted, tmp_path):
    hub, run_dir = StandinHub(tmp_path / "hub"), tmp_path / "run"
    args = ("--train.output_dir", str(run_dir), "--push-to-hub", "alice/lost", "--push-checkpoints")
    proc = _finetune(recipe, hub.root, *args, step_seconds=0.3, log=tmp_path / "first.log")
    try:
        _wait_for(lambda: len(hub.commits()) >= 2 or proc.poll() is not None, 300, "two checkpoint pushes")
        proc.kill()  # SIGKILL: no handler runs, as when Colab drops the VM
    finally:
        proc.kill()
        proc.wait(60)
    first = (tmp_path / "first.log").read_text()
    assert proc.returncode == -signal.SIGKILL, first[-3000:]
    assert [c["message"] for c in hub.commits()][:2] == ["checkpoint 4", "checkpoint 8"]
    assert not (run_dir / "summary.json").exists()  # it really was cut off before the end
    pushed = sorted(int(p.name.split("-")[1]) for p in (hub.repo("alice/lost") / "checkpoints").iterdir())
    assert 8 <= pushed[-1] < MAX_STEPS, pushed

    shutil.rmtree(run_dir)  # the new machine starts with nothing
    proc = _finetune(recipe, hub.root, *args, "--resume")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert f"resuming from checkpoint-{pushed[-1]} (step {pushed[-1]}) from the Hub repo alice/lost" in output
    assert output.count("[harness] step") == MAX_STEPS - pushed[-1]  # it went on, it did not start over
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS
    assert summary["interruptions"] == [{"step": pushed[-1], "checkpoint": f"checkpoint-{pushed[-1]}",
                                         "from": "alice/lost"}]
    assert f"resumed at step {pushed[-1]} from the Hub repo alice/lost" in (run_dir / "README.md").read_text()
    _assert_same_weights(_adapter(run_dir), _adapter(uninterrupted))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_pushes_it_and_resume_finishes_the_same(recipe, uninterrupted, tmp_path):
    hub, run_dir = StandinHub(tmp_path / "hub"), tmp_path / "run"
    args = ("--train.output_dir", str(run_dir), "--train.save_steps", "100", "--push-to-hub", "bob/spot",
            "--push-checkpoints")
    log = tmp_path / "first.log"
    proc = _finetune(recipe, hub.root, *args, step_seconds=0.3, log=log)
    try:
        _wait_for(lambda: log.read_text().count("[harness] step") >= 3 or proc.poll() is not None, 300,
                  "three training steps")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        took = time.monotonic() - signalled
    finally:
        proc.kill()
    first = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, first[-3000:]
    assert took < 60, took  # one step, a checkpoint and its push; generous for a busy 2-core box
    assert "SIGTERM received: finishing this step" in first
    (ckpt,) = run_dir.glob("checkpoint-*")  # save_steps=100: only the signal saved one
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert ckpt.name == f"checkpoint-{step}" and 3 <= step < MAX_STEPS
    assert f"stopped by SIGTERM at step {step}; checkpoint-{step} is saved" in first
    assert f"checkpoints/checkpoint-{step}/adapter_model.safetensors" in hub.files("bob/spot")  # push awaited
    assert not (run_dir / "summary.json").exists()

    proc = _finetune(recipe, hub.root, *args, "--resume")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert f"resuming from checkpoint-{step} (step {step}) from output_dir" in output
    assert output.count("[harness] step") == MAX_STEPS - step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["resumed_from"] == f"checkpoint-{step}"
    assert summary["interruptions"] == [{"step": step, "checkpoint": f"checkpoint-{step}", "from": "local"}]
    _assert_same_weights(_adapter(run_dir), _adapter(uninterrupted))


def test_sigterm_while_writing_the_outputs_exits_cleanly_and_resume_completes_them(tmp_path, small_vocab_llama_dir,
                                                                                   monkeypatch, capsys):
    """After the last step: a SIGTERM as the merge starts lets it finish its files (no partial merged/), stops
    before the GGUF export, summary and upload with one line and exit 143; --resume trains no step and completes
    the run from the final checkpoint."""
    from transformers import TrainerCallback

    import training.export.merge as merge_module
    from training.finetune import run

    class Killed(Exception):
        """What this test's own SIGTERM handler raises: a signal nobody handled does not end pytest."""

    def killed(signum, frame):
        raise Killed

    real_merge = merge_module.merge_adapter

    def signalled_merge(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_merge(*args, **kwargs)

    class Steps(TrainerCallback):
        count = 0

        def on_step_end(self, args, state, control, **kwargs):
            Steps.count += 1

    cfg = _cfg(tmp_path, small_vocab_llama_dir, "run", **{"train.max_steps": 4, "export.merge": True,
                                                           "export.merged_dtype": "float32"})
    run_dir = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        monkeypatch.setattr(merge_module, "merge_adapter", signalled_merge)
        with pytest.raises(SystemExit) as stopped:
            run(cfg)
        assert stopped.value.code == 143
        assert signal.getsignal(signal.SIGTERM) is killed  # the run's handler is gone with the run
        out = capsys.readouterr().out
        assert "stopped by SIGTERM after training, while writing the outputs; checkpoint-4 holds the trained " \
               "model: the same command plus --resume writes them (exit status 143)" in out, out[-2000:]
        assert (run_dir / "merged" / "config.json").is_file() and not list(run_dir.glob("merged.*"))
        assert not (run_dir / "summary.json").exists()

        monkeypatch.setattr(merge_module, "merge_adapter", real_merge)
        summary = run(apply_overrides(cfg, {"train.resume": True}), callbacks=[Steps()])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert Steps.count == 0 and summary["steps"] == 4 and summary["resumed_from"] == "checkpoint-4"
    assert (run_dir / "summary.json").is_file() and (run_dir / "merged" / "config.json").is_file()
    # The whole run's mean train loss (logged every step here), not the 0.0 of a session that trained no step.
    losses = [p["loss"] for p in summary["train_loss"]]
    assert len(losses) == 4 and summary["final_train_loss"] == pytest.approx(sum(losses) / 4)


def test_the_push_after_a_signal_waits_only_what_is_left_of_the_notice(tmp_path, small_vocab_llama_dir, monkeypatch,
                                                                       capsys):
    """A spot instance is killed train.preemption_notice_s after its SIGTERM: the checkpoint push is awaited only
    within that, not for the 300 s an ordinary end of training allows."""
    from lost_machine_harness import signal_at
    from training.finetune import run

    StandinHub(tmp_path / "hub", commit_seconds=3).install(monkeypatch.setattr)
    cfg = _cfg(tmp_path, small_vocab_llama_dir, "run", **{"train.max_steps": 6, "train.save_steps": 100,
                                                           "hub.push_to_hub": "erin/spot", "hub.push_checkpoints": True,
                                                           "train.preemption_notice_s": 1})
    with pytest.raises(SystemExit) as stopped:
        run(cfg, callbacks=[signal_at(2)])
    assert stopped.value.code == 143
    out = capsys.readouterr().out
    waits = [float(w) for w in re.findall(r"waiting up to ([\d.]+) s for the push of checkpoint-2", out)]
    assert waits and waits[0] <= 1, out[-2000:]
    assert "checkpoint push still running after" in out and "not waiting longer" in out


@pytest.mark.slow
def test_torchrun_ranks_stop_together_when_one_is_signalled_mid_evaluation(tmp_path, small_vocab_llama_dir):
    """DDP (torchrun, 2 CPU processes): SIGTERM to rank 1 alone during an evaluation. Both ranks take the same
    decision (the flags are all-reduced at every step and every eval batch): the evaluation stops within a batch on
    both, both save checkpoint-2 and exit 143; none waits for the other in a collective."""
    cfg = _cfg(tmp_path, small_vocab_llama_dir, "ddp", **{"train.max_steps": 6, "train.eval_steps": 2,
                                                           "train.save_steps": 100,
                                                           "train.per_device_eval_batch_size": 1})
    cfg.data.validation_path = str(_write_jsonl(tmp_path / "valid16.jsonl", 16, offset=200))  # 8 batches a rank
    recipe = save_config(cfg, tmp_path / "recipe.yaml")
    log = tmp_path / "ddp.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(HARNESS), str(FINETUNE), "--config", str(recipe)], cwd=REPO,
                                env={**_env(tmp_path / "hub"), "HARNESS_EVAL_SECONDS": "1"}, stdout=sink,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: "[harness] eval batch rank 1 step 2" in log.read_text() or proc.poll() is not None, 300,
                  "the evaluation at step 2")
        seen = log.read_text()
        pid = int(re.search(r"\[harness\] rank 1 pid (\d+)", seen).group(1))
        os.kill(pid, signal.SIGTERM)
        proc.wait(300)  # ranks that disagree wait for each other in a collective until this times out
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, whatever happened
        except ProcessLookupError:  # all ended
            pass
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    assert text.count("stopped by SIGTERM at step 2; checkpoint-2 is saved") == 2, text[-3000:]  # both ranks
    assert [p.name for p in (tmp_path / "ddp").glob("checkpoint-*")] == ["checkpoint-2"]
    assert (tmp_path / "ddp" / "checkpoint-2" / "trainer_state.json").is_file()
    # Counted from the signal, however late this test saw the first batch on a busy machine: the batch under way and,
    # for a rank a batch behind, one more; the whole evaluation is 8 batches a rank (1 s each).
    after_signal = text[len(seen):]
    for rank in (0, 1):
        assert after_signal.count(f"[harness] eval batch rank {rank} step 2") <= 2, text[-3000:]
    assert "[harness] step" not in text.split("[harness] eval batch rank 1 step 2", 1)[1]  # no step after it


def _fake_checkpoint(folder: Path, step: int, r: int = 16, targets=("q_proj", "v_proj"), recipe: dict | None = None):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16, "target_modules": targets}))
    callbacks = {"RunRecord": {"args": {"recipe": recipe, "interruptions": []}, "attributes": {}}} if recipe else {}
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "stateful_callbacks": callbacks}))
    (folder / "adapter_model.safetensors").write_text("x")


def test_mismatched_checkpoint_is_one_line_exit_2_and_nothing_written(recipe, tmp_path, monkeypatch, capsys):
    from training.finetune import main

    hub = StandinHub(tmp_path / "hub").install(monkeypatch.setattr)
    _fake_checkpoint(hub.repo("alice/r16") / "checkpoints" / "checkpoint-4", 4, r=16)
    fresh = tmp_path / "fresh"
    assert main(["--config", str(recipe), "--output_dir", str(fresh), "--resume", "--push-to-hub", "alice/r16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "checkpoint-4 in the Hub repo alice/r16 was trained with lora.r=16 but the recipe has lora.r=8" in err
    assert not fresh.exists()

    # A local checkpoint of another base (recorded in its trainer_state.json): the run dir is left untouched.
    local = tmp_path / "local"
    _fake_checkpoint(local / "checkpoint-8", 8, r=8, recipe={"model.name_or_path": "other/base", "lora.r": 8})
    (local / "config.yaml").write_text("the earlier run's recipe\n")
    before = {p: p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert main(["--config", str(recipe), "--output_dir", str(local), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.name_or_path=other/base" in err and "output_dir" in err, err
    assert {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == before

    # Explicit target modules are compared as sets.
    wrong = tmp_path / "targets"
    _fake_checkpoint(wrong / "checkpoint-4", 4, r=8, targets=["q_proj", "k_proj"])
    assert main(["--config", str(recipe), "--output_dir", str(wrong), "--resume",
                 "--target_modules", "v_proj,q_proj"]) == 2
    assert "lora.target_modules=k_proj,q_proj but the recipe has lora.target_modules=q_proj,v_proj" in \
        capsys.readouterr().err


def test_resume_point_local_hub_or_fresh(tmp_path, monkeypatch, tiny_llama_dir):
    from training.trainer.resume import find_resume_point

    hub = StandinHub(tmp_path / "hub").install(monkeypatch.setattr)
    lines: list[str] = []
    cfg = _cfg(tmp_path, tiny_llama_dir, "run", **{"push_to_hub": "carol/x", "target_modules": "q_proj,v_proj"})
    assert find_resume_point(cfg, lines.append) is None
    assert "does not exist" in lines[-2] and "starting fresh" in lines[-1]
    assert not (tmp_path / "run").exists()

    hub.create_repo(None, "carol/x")  # a repo without checkpoints
    assert find_resume_point(cfg, lines.append) is None and "starting fresh" in lines[-1]

    _fake_checkpoint(hub.repo("carol/x") / "checkpoints" / "checkpoint-8", 8, r=8)
    _fake_checkpoint(tmp_path / "run" / "checkpoint-4", 4, r=8)
    (tmp_path / "run" / "checkpoint-12").mkdir()  # cut off mid-save: no trainer_state.json
    point = find_resume_point(cfg, lines.append)
    assert (point.step, point.source) == (8, "carol/x") and (point.path / "adapter_model.safetensors").is_file()
    assert any("checkpoint-12 is incomplete" in line for line in lines)

    _fake_checkpoint(tmp_path / "run" / "checkpoint-16", 16, r=8)  # local is newer: no download
    point = find_resume_point(cfg, lines.append)
    assert (point.step, point.source, point.path) == (16, "local", tmp_path / "run" / "checkpoint-16")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_files", offline)
    assert find_resume_point(cfg, lines.append).step == 16 and "cannot reach" in lines[-2]
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(ConfigError, match="cannot list the checkpoints of the Hub repo carol/x"):
        find_resume_point(cfg, lines.append)


def _save(pusher, out: Path, step: int, files=("adapter_model.safetensors", "optimizer.pt")) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in files + ("trainer_state.json",):
        (ckpt / name).write_text(f"{name} at {step}")
    pusher.on_save(SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=step,
                                                                        is_world_process_zero=True), None)
    return ckpt


def test_checkpoint_pushes_run_in_the_background_from_finished_folders(tmp_path, monkeypatch):
    from training.export.hub import CheckpointPusher

    hub = StandinHub(tmp_path / "hub", commit_seconds=0.5).install(monkeypatch.setattr)
    lines: list[str] = []
    pusher = CheckpointPusher("dan/run", keep=2, wait_s=30, log=lines.append)
    out = tmp_path / "out"
    started = time.monotonic()
    first = _save(pusher, out, 10)
    assert time.monotonic() - started < 0.4  # on_save does not wait for the 0.5 s commit
    shutil.rmtree(first)  # rotation deletes it while the upload runs: the upload has its own hard links
    for step in (20, 30, 40):
        _save(pusher, out, step)  # saved while checkpoint-10 uploads: only the newest waits
    assert pusher.wait(30)
    assert pusher.pushed == [10, 40]
    assert hub.files("dan/run") == [f"checkpoints/checkpoint-{s}/{f}" for s in (10, 40)
                                    for f in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")]
    assert (hub.repo("dan/run") / "checkpoints/checkpoint-10/optimizer.pt").read_text() == "optimizer.pt at 10"
    assert not (out / ".hub-push").exists() or not any((out / ".hub-push").iterdir())

    # keep=2: the oldest goes with the next push; a failed push is reported, training is not stopped.
    hub.fail_commits = 1
    _save(pusher, out, 50)
    assert pusher.wait(30) and pusher.failed and pusher.failed[0][0] == 50
    assert any("push of checkpoint-50 to dan/run failed (OSError: stand-in network failure)" in line
               for line in lines)
    _save(pusher, out, 60)
    assert pusher.wait(30) and pusher.pushed[-1] == 60
    assert {f.split("/")[1] for f in hub.files("dan/run")} == {"checkpoint-40", "checkpoint-60"}
    assert "removed checkpoint-10" in lines[-1]

    # A fresh run (no --resume) is warned, and replaces the checkpoints newer than its own left by an earlier run.
    pusher.on_train_begin(SimpleNamespace(output_dir=str(out / "again")),
                          SimpleNamespace(global_step=0, is_world_process_zero=True), None)
    assert "holds checkpoint-60 of an earlier run" in lines[-1] and "add --resume" in lines[-1]
    _save(pusher, out / "again", 5)
    assert pusher.wait(30)
    assert {f.split("/")[1] for f in hub.files("dan/run")} == {"checkpoint-5"}

    # Bounded wait: a push slower than the wait is left running, with a message.
    hub.commit_seconds = 3
    _save(pusher, out, 70)
    assert pusher.wait(0.5) is False and "not waiting longer" in lines[-1]
    pusher.on_save(SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=80,
                                                                        is_world_process_zero=False), None)
    assert pusher.wait(30) and pusher.pushed[-1] == 70  # another DDP rank's save is not pushed


def test_save_minutes_and_signals_set_the_trainer_controls():
    from transformers import TrainerControl

    from training.trainer.preemption import SaveOnPreemption

    now = [0.0]
    lines: list[str] = []
    guard = SaveOnPreemption(save_minutes=2, log=lines.append, clock=lambda: now[0])
    handler_before = signal.getsignal(signal.SIGINT)
    args, state = SimpleNamespace(device="cpu"), SimpleNamespace(global_step=1)
    guard.on_train_begin(args, state, TrainerControl())
    try:
        now[0] = 119
        assert not guard.on_step_end(args, state, TrainerControl()).should_save
        now[0] = 120
        assert guard.on_step_end(args, state, TrainerControl()).should_save  # two minutes: save
        guard.on_save(args, state, TrainerControl())
        now[0] = 200
        control = guard.on_step_end(args, state, TrainerControl())
        assert not control.should_save and not control.should_training_stop  # counted from the last save
        os.kill(os.getpid(), signal.SIGINT)
        # The handler only records it: writing from a signal handler can re-enter a print the main thread is in
        # ("reentrant call"); the line is logged by the next callback.
        assert guard.signum == signal.SIGINT and lines == []
        control = guard.on_step_end(args, state, TrainerControl())
        assert control.should_save and control.should_training_stop
        assert lines == ["SIGINT received: finishing this step, saving a checkpoint, then exiting (send SIGINT "
                         "again to exit at once)"]
        with pytest.raises(SystemExit) as stop:
            guard.exit_if_interrupted()
        assert stop.value.code == 130
    finally:
        guard.release()
    assert signal.getsignal(signal.SIGINT) is handler_before


@pytest.mark.slow
def test_save_minutes_checkpoints_between_save_steps(tmp_path, tiny_llama_dir):
    from training.finetune import run

    cfg = _cfg(tmp_path, tiny_llama_dir, "run", **{"train.max_steps": 3, "train.save_steps": 100,
                                                   "train.save_minutes": 1e-6})
    run(cfg)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    # Resuming a checkpoint written before runs carried a RunRecord (Trainer would fail on its missing slot);
    # the record then travels on in the new checkpoints.
    shutil.rmtree(out / "checkpoint-3")
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["stateful_callbacks"].pop("RunRecord")["args"]["recipe"]["lora.r"] == 8
    state_file.write_text(json.dumps(state))
    summary = run(apply_overrides(cfg, {"train.resume": True}))
    assert summary["steps"] == 3
    assert summary["interruptions"] == [{"step": 2, "checkpoint": "checkpoint-2", "from": "local"}]
    record = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["stateful_callbacks"]["RunRecord"]
    assert record["args"]["interruptions"] == summary["interruptions"]


@pytest.mark.parametrize("recorded, told", [
    ({"train.objective": "dpo", "train.beta": 0.1}, "train.objective=dpo but the recipe has train.objective=sft"),
    ({"train.per_device_train_batch_size": 2}, "train.per_device_train_batch_size=2 but the recipe has "
                                               "train.per_device_train_batch_size=4"),
    ({"train.gradient_accumulation_steps": 4}, "train.gradient_accumulation_steps=4 but the recipe has "
                                               "train.gradient_accumulation_steps=1"),
    ({"train.max_length": 2048}, "train.max_length=2048 but the recipe has train.max_length=64"),
    ({"train.packing": True}, "train.packing=True but the recipe has train.packing=False"),
    ({"chat_template": "0123456789ab"}, "was trained with another chat template than this recipe's "
                                        "model.chat_template=None gives (chat_template 0123456789ab there"),
    ({"new_token_ids": [49152]}, "was trained with another set of tokens added by the chat template"),
    ({"model.mode": "qlora"}, "model.mode=qlora but the recipe has model.mode=fp32"),
])
def test_a_checkpoint_of_another_objective_batch_length_template_or_mode_is_refused(recipe, tmp_path, capsys,
                                                                                     recorded, told):
    """What fixes the model a run trains (objective, beta, template -> trainable token ids, mode) or the data order
    it resumes into (batch x accumulation, max_length, packing) is part of the checkpoint's identity."""
    from transformers import AutoTokenizer

    from training.chat_format import prepare_tokenizer
    from training.finetune import main
    from training.trainer.resume import check_matches, find_resume_point, recipe_identity

    run_dir = tmp_path / "run"
    cfg = load_config(recipe)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    identity = recipe_identity(cfg, tokenizer, prepare_tokenizer(tokenizer))  # the recipe's own, one value changed
    assert set(recorded) <= set(identity) | {"train.beta"}, sorted(identity)
    _fake_checkpoint(run_dir / "checkpoint-4", 4, r=8, recipe={**identity, **recorded})
    assert main(["--config", str(recipe), "--output_dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and told in err and "resume with the recipe it was trained with" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-4"]  # refused before anything was written
    # The recipe's own identity passes the check.
    _fake_checkpoint(tmp_path / "same" / "checkpoint-4", 4, r=8, recipe=identity)
    point = find_resume_point(load_config(recipe, {"train.output_dir": str(tmp_path / "same"), "train.resume": True}),
                              lambda _m: None)
    check_matches(point, cfg, identity)


def test_a_dpo_recipe_records_its_beta_and_an_sft_one_does_not(recipe):
    from training.trainer.resume import recipe_identity

    sft = recipe_identity(load_config(recipe))
    dpo = recipe_identity(load_config(recipe, {"train.objective": "dpo", "train.beta": 0.2}))
    assert "train.beta" not in sft and (dpo["train.objective"], dpo["train.beta"]) == ("dpo", 0.2)
