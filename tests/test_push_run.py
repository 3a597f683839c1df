"""A second run into the same output folder and Hub repo: the merge and the upload carry only the current files.

transformers prefers a single model.safetensors over a sharded index, so a weight file left by an earlier merge or
push would be the model that loads. The upload runs through huggingface_hub's real HfApi against a local stand-in
for the Hub (tests/lost_machine_harness.py), never the network.
"""
from __future__ import annotations

import json

import torch
from lost_machine_harness import StandinHub


def _adapter(base, out_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    model.save_pretrained(out_dir)
    return out_dir


def _run_outputs(run, base, adapter, tokenizer, dtype: str, gguf: str) -> None:
    """What finetune.py leaves in OUT for an upload: merged/, gguf/, adapter/, summary.json naming its GGUF."""
    from training.export.merge import merge_adapter

    merge_adapter(str(base), adapter, run / "merged", tokenizer, dtype)
    (run / "gguf").mkdir(exist_ok=True)
    (run / "gguf" / gguf).write_bytes(b"GGUF")
    (run / "adapter").mkdir(exist_ok=True)
    for f in adapter.iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    (run / "summary.json").write_text(json.dumps({"gguf_files": [gguf]}))


def test_second_run_into_the_same_folder_and_repo_leaves_only_its_own_model_files(tmp_path, tiny_llama_dir,
                                                                                  monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import training.export.merge as merging
    from training.export.hub import push_run

    hub = StandinHub(tmp_path / "hub").install(monkeypatch.setattr)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    adapter, run, repo = _adapter(tiny_llama_dir, tmp_path / "adapter"), tmp_path / "run", "alice/tiny"

    _run_outputs(run, tiny_llama_dir, adapter, tokenizer, "bfloat16", "run-q8_0.gguf")
    push_run(run, repo)
    hub.repo(repo).joinpath("run", "notes.txt").write_text("kept")  # run records are not model files
    assert {"model.safetensors", "run-q8_0.gguf"} <= set(hub.files(repo))

    monkeypatch.setattr(merging, "MAX_SHARD_BYTES", 2_000_000)  # this time the merge is sharded, in fp32
    _run_outputs(run, tiny_llama_dir, adapter, tokenizer, "float32", "run-q4_k_m.gguf")
    assert (run / "gguf" / "run-q8_0.gguf").is_file()  # the earlier export is still in OUT/gguf ...
    push_run(run, repo)

    files = set(hub.files(repo))
    assert "run-q8_0.gguf" not in files and "run-q4_k_m.gguf" in files  # ... but neither uploaded nor kept
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    shards = json.loads((hub.repo(repo) / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert {f for f in files if f.endswith(".safetensors") and "/" not in f} == set(shards)
    assert "run/notes.txt" in files and "adapter/adapter_model.safetensors" in files
    assert hub.commits()[-1]["deleted"] == ["model.safetensors", "run-q8_0.gguf"]
    assert AutoModelForCausalLM.from_pretrained(hub.repo(repo)).dtype == torch.float32  # the new merge loads
