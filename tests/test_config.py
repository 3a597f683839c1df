"""Recipe config: YAML + CLI overrides, shorthand leaves, errors that name the key, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import (ConfigError, TrainConfig, apply_overrides, config_to_dict, help_text, load_config,
                             parse_config, save_config)
from training.data import SourceConfig

RECIPES = sorted((Path(__file__).resolve().parent.parent / "training" / "configs").glob("*.yaml"))


def _write(tmp_path, tree) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_cli_overrides_yaml_full_and_short_names(tmp_path):
    recipe = _write(tmp_path, {"lora": {"r": 32}, "train": {"learning_rate": 1e-3, "max_steps": 5},
                               "data": {"sources": [{"path": "a.jsonl", "format": "sharegpt"}]}})
    cfg = parse_config(["--config", str(recipe), "--train.learning_rate", "1e-4", "--r", "8",
                        "--max_steps=7", "--resume", "--push-to-hub", "me/model"])
    assert cfg.lora.r == 8 and isinstance(cfg.lora.r, int)
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.max_steps == 7
    assert cfg.train.resume is True
    assert cfg.hub.push_to_hub == "me/model"
    assert cfg.data.sources == [SourceConfig(path="a.jsonl", format="sharegpt")]
    assert cfg.lora.alpha == TrainConfig().lora.alpha  # untouched leaves keep defaults


def test_bool_flag_takes_explicit_value():
    assert parse_config(["--model.gradient_checkpointing", "false"]).model.gradient_checkpointing is False
    assert parse_config(["--packing"]).train.packing is True


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"'lora\.rank'.*lora\.r"):
        load_config(_write(tmp_path, {"lora": {"rank": 8}}))
    with pytest.raises(ConfigError, match=r"'optimizer'.*train"):
        load_config(_write(tmp_path, {"optimizer": {"lr": 1}}))
    with pytest.raises(ConfigError, match=r"data\.sources\[\]\.fmt.*format"):
        load_config(_write(tmp_path, {"data": {"sources": [{"path": "x", "fmt": "alpaca"}]}}))


def test_unknown_and_ambiguous_cli_keys():
    with pytest.raises(ConfigError, match=r"unknown option 'lr'.*train\.learning_rate"):
        parse_config(["--lr", "1e-4"])
    with pytest.raises(ConfigError, match=r"ambiguous.*data\.seed.*train\.seed"):
        parse_config(["--seed", "1"])


def test_bad_values_name_option_and_accepted():
    with pytest.raises(ConfigError, match=r"lora\.r must be int, got 'eight'"):
        apply_overrides(TrainConfig(), {"r": "eight"})
    with pytest.raises(ConfigError, match=r"model\.mode='gpu'.*qlora"):
        apply_overrides(TrainConfig(), {"mode": "gpu"})
    with pytest.raises(ConfigError, match=r"model\.precision='fp8'.*auto, bf16, fp16, fp32"):
        apply_overrides(TrainConfig(), {"precision": "fp8"})
    assert apply_overrides(TrainConfig(), {"mode": "lora", "precision": "fp16"}).model.precision == "fp16"
    with pytest.raises(ConfigError, match=r"train\.save_steps must be >= 1"):
        apply_overrides(TrainConfig(), {"save_steps": 0})


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out == help_text() + "\n"
    for section, fields in config_to_dict(TrainConfig()).items():
        for name in fields:
            assert f"--{section}.{name} (default:" in out


def test_save_then_load_round_trip(tmp_path):
    cfg = apply_overrides(TrainConfig(), {"r": 4, "data.sources": "x.jsonl,y.csv", "gguf_quants": "q4_k_m,q8_0",
                                          "near_dedup": "0.9", "save_total_limit": "none"})
    back = load_config(save_config(cfg, tmp_path / "config.yaml"))
    assert back == cfg
    assert back.export.gguf_quants == ["q4_k_m", "q8_0"] and back.train.save_total_limit is None


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_load(recipe):
    cfg = load_config(recipe)
    assert cfg.data.sources, "every recipe names its data"
    assert cfg.train.output_dir.startswith("runs/")


def test_reference_recipe_hyperparameters():
    cfg = load_config(Path(RECIPES[0]).parent / "llama-3.2-1b-finetome.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (16, 16, 0.0, ["all-linear"])
    t = cfg.train
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs,
            t.max_length, t.optim, t.save_steps) == (2e-4, 2, 4, 1.0, 2048, "adamw_8bit", 1250)
    assert t.warmup_ratio > 0 and cfg.data.validation_fraction > 0 and cfg.model.mode == "auto"
