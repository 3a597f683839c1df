"""training/sweep.py: a 2x1 grid of real finetune.py runs on a tiny model, each in its own process, ranked by held-out
loss on one pinned held-out set, and the best recipe written back out for finetune.py."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, load_config
from training.sweep import grid_points, main, parse_grid, run_sweep

TOPICS = ["apples", "rivers", "clocks", "stars", "bread", "rain", "chess", "trains"]


def _recipe(tmp_path: Path, model_dir) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % 8]} (#{i})."},
                          {"role": "assistant", "content": f"{TOPICS[i % 8].capitalize()} are nice. Number {i}."}]}
            for i in range(20)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"model": {"name_or_path": str(model_dir), "mode": "fp32", "gradient_checkpointing": False},
              "lora": {"r": 8, "alpha": 16},
              "data": {"sources": [{"path": str(data), "format": "messages"}], "validation_fraction": 0.2,
                       "dedup": False},
              "train": {"output_dir": "runs/tiny", "max_length": 128, "max_steps": 50,
                        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                        "learning_rate": 1e-4, "warmup_ratio": 0.0, "optim": "adamw_torch", "report_to": "none",
                        "logging_steps": 1},
              "export": {"gguf": True}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# What Liger does on a GPU, done by every grid point: replace a class of the modelling module, so that every model
# built afterwards in that process is different. Each call logs whether an earlier point's patch was still there.
LEAKY_RUN = textwrap.dedent("""
    import json, os

    def install(log_path):
        import transformers.models.llama.modeling_llama as modeling
        import training.finetune as finetune

        original_run = finetune.run

        def run(cfg, *args, **kwargs):
            with open(log_path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "output_dir": cfg.train.output_dir,
                                    "patched_by": getattr(modeling.LlamaRMSNorm, "patched_by", None)}) + "\\n")
            modeling.LlamaRMSNorm = type("PatchedRMSNorm", (modeling.LlamaRMSNorm,),
                                         {"patched_by": cfg.train.output_dir})
            return original_run(cfg, *args, **kwargs)

        finetune.run = run

    if os.environ.get("LEAKY_RUN_LOG"):
        install(os.environ["LEAKY_RUN_LOG"])
""")


@pytest.fixture
def leaky_points(tmp_path, monkeypatch):
    """Every finetune.run, in this process and in any Python process started from it (sitecustomize), patches a
    module global and logs what it found; returns the log's path."""
    import importlib.util

    import training.finetune
    import transformers.models.llama.modeling_llama as modeling

    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(LEAKY_RUN)
    log = tmp_path / "runs.log"
    monkeypatch.setenv("LEAKY_RUN_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(training.finetune, "run", training.finetune.run)  # restored afterwards
    monkeypatch.setattr(modeling, "LlamaRMSNorm", modeling.LlamaRMSNorm)
    spec = importlib.util.spec_from_file_location("leaky_run", hook_dir / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # installs the hook here too: a point run in this process would leak
    return log


@pytest.mark.slow
def test_two_run_sweep_ranks_by_heldout_loss_and_writes_best_recipe(tmp_path, tiny_llama_dir, leaky_points):
    recipe = _recipe(tmp_path, tiny_llama_dir)
    out = tmp_path / "sweep"
    results = run_sweep(recipe, parse_grid(["lr=1e-5,1e-2"]), out, max_steps=6)

    # Process isolation: each point ran in its own process and found no other point's patch.
    calls = [json.loads(line) for line in leaky_points.read_text().splitlines()]
    assert [c["output_dir"] for c in calls] == [r["output_dir"] for r in results["runs"]]
    assert len({c["pid"] for c in calls}) == 2 and os.getpid() not in {c["pid"] for c in calls}
    assert [c["patched_by"] for c in calls] == [None, None]

    runs = results["runs"]
    assert len(runs) == 2 and all("error" not in r for r in runs), runs
    ranked = sorted(runs, key=lambda r: r["rank"])
    assert [r["rank"] for r in ranked] == [1, 2] and ranked[0]["loss"] < ranked[1]["loss"]
    assert results["ranking"] == [r["run"] for r in ranked]
    assert ranked[0]["overrides"] == {"train.learning_rate": "1e-2"}  # 6 steps at 1e-5 barely move the weights
    assert ranked[0]["loss"] < results["baseline"]["loss"]
    assert all(r["steps"] == 6 for r in runs)

    # One fixed held-out set: the recipe's split computed once, then every run validates on exactly that file.
    heldout = (out / "heldout.jsonl").read_text().splitlines()
    assert results["heldout_rows"] == len(heldout) == 4
    assert all(r["tokens"] == runs[0]["tokens"] for r in runs)
    # One figure for one model on these rows: finetune's eval loss is the sweep's held-out loss of its merged model.
    assert all(r["loss"] == pytest.approx(r["trainer_eval_loss"], rel=1e-5) for r in runs), runs
    for r in runs:
        cfg = yaml.safe_load((Path(r["output_dir"]) / "config.yaml").read_text())
        assert cfg["data"]["validation_path"] == str(out / "heldout.jsonl")
        assert not (Path(r["output_dir"]) / "merged").exists()  # big files cleaned, the adapter kept
        assert (Path(r["output_dir"]) / "adapter" / "adapter_config.json").is_file()
        assert not list((Path(r["output_dir"])).glob("gguf/*.gguf"))  # sweeps never export GGUF

    best = load_config(out / "best.yaml")
    assert best.train.learning_rate == pytest.approx(1e-2)
    assert best.train.max_steps == 50 and best.data.validation_path is None  # the recipe's, not the sweep's
    assert best.model.name_or_path == str(tiny_llama_dir) and best.export.gguf is True
    table = (out / "sweep.md").read_text()
    assert table.index("| 1 | 1e-2 |") < table.index("| 2 | 1e-5 |") and "| base |" in table
    assert "cut at 128 tokens (the recipe's train.max_length)" in table
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_grid_parsing_covers_model_and_data_keys():
    grid = parse_grid(["lr=1e-4,2e-4", "r=8,16", "data.near_dedup=none,0.85",
                       "target_modules=[q_proj,v_proj],[all-linear]"])
    assert grid[0] == ("train.learning_rate", ["1e-4", "2e-4"])
    assert grid[3] == ("target_modules", ["[q_proj,v_proj]", "[all-linear]"])
    points = grid_points(grid)
    assert len(points) == 16 and points[0] == {"train.learning_rate": "1e-4", "r": "8", "data.near_dedup": "none",
                                               "target_modules": "[q_proj,v_proj]"}
    for bad in (["lr"], ["lr="], ["lr=1,,2"], ["lr=1", "lr=2"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_bad_grid_key_fails_before_any_run(tmp_path, tiny_llama_dir, capsys):
    recipe = _recipe(tmp_path, tiny_llama_dir)
    assert main(["--config", str(recipe), "--grid", "nope=1,2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope'" in err
    assert not (tmp_path / "o" / "runs").exists()
    assert main(["--config", str(recipe), "--grid", "lr=abc", "--out", str(tmp_path / "o")]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
