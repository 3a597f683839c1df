"""The shipped CPU recipe starts from the embedded SmolLM2 GGUF and trains a few steps.

The full recipe (`python training/finetune.py --config training/configs/smollm2-135m-cpu.yaml`) is a manual
command; its measured time and losses are in the training notes. Here: the same recipe, cut to 2 steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from training.config import load_config

RECIPE = Path(__file__).resolve().parent.parent / "training" / "configs" / "smollm2-135m-cpu.yaml"


@pytest.mark.slow
def test_smollm2_cpu_recipe_starts_and_trains(tmp_path, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.finetune import run

    cfg = load_config(RECIPE, {"train.output_dir": str(tmp_path / "run"), "max_steps": 2,
                               "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                               "max_length": 128, "logging_steps": 1, "eval_steps": 0,
                               "data.max_rows": 16, "validation_fraction": 0.02, "export.gguf": False})
    assert cfg.model.name_or_path == "embedded" and cfg.data.sources[0].path.endswith("sample.jsonl")
    summary = run(cfg)
    out = Path(cfg.train.output_dir)

    assert summary["steps"] == 2 and summary["mode"] == "fp32"
    first = summary["train_loss"][0]["loss"]
    # A pretrained model, not random weights: far below ln(vocab) = 10.8 on in-domain chat.
    assert math.isfinite(first) and first < 7.0
    assert summary["final_eval_loss"] is not None and summary["final_eval_loss"] < 7.0

    base_cfg = json.loads((out / "base" / "config.json").read_text())
    assert "quantization_config" not in base_cfg  # the dequantised GGUF became a plain, trainable checkpoint
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and tok.pad_token_id != tok.eos_token_id
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.config.model_type == "llama" and merged.config.num_hidden_layers == 30
