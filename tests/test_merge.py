"""training/export/merge.py: the streamed merge writes exactly the weights peft's merge_and_unload gives, on a tiny Llama
whose tokenizer gained a token (LoRA on every linear layer + trained token rows), and loads like any checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from training.export.merge import merge_adapter, read_adapter


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_llama_dir):
    """An adapter as finetune.py saves one, with random (non-zero) LoRA A/B and token rows, and peft's own merge of
    it (merge_and_unload on the fp32 base) as the expected state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new_turn|>"]}, replace_extra_special_tokens=False)
    new_id = tokenizer.convert_tokens_to_ids("<|new_turn|>")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base_vocab = model.get_input_embeddings().weight.shape[0]
    assert len(tokenizer) == base_vocab + 1  # the merge has to grow the vocabulary
    model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                             trainable_token_indices=[new_id]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # lora_B starts at zero: a merge of it would prove nothing
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter_dir)
    expected = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return tokenizer, adapter_dir, expected, new_id


def _saved_tensors(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_streamed_merge_equals_peft_merge_and_unload(tmp_path, tiny_llama_dir, trained_adapter):
    tokenizer, adapter_dir, expected, new_id = trained_adapter
    changes, why = read_adapter(adapter_dir)
    lora = {name for name, cs in changes.items() if any(c[0] == "lora" for c in cs)}
    assert why is None and len(lora) == 2 * 7  # 2 layers x 7 linear layers
    out = merge_adapter(str(tiny_llama_dir), adapter_dir, tmp_path / "merged", tokenizer, "float32")

    got = _saved_tensors(out)
    base = _saved_tensors(tiny_llama_dir)
    assert set(got) == set(base) == set(expected) - {"lm_head.weight"}  # tied: saved once, like save_pretrained
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
        if name in lora:  # every targeted layer really changed (a skipped one would still equal the base)
            assert not torch.allclose(tensor, base[name].float()), name
    assert got["model.embed_tokens.weight"].shape[0] == len(tokenizer)
    torch.testing.assert_close(got["model.embed_tokens.weight"][new_id], expected["model.embed_tokens.weight"][new_id])

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) and config["use_cache"] is True
    assert config["pad_token_id"] == tokenizer.pad_token_id and config["eos_token_id"] == tokenizer.eos_token_id
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_merged_dir_loads_and_computes_the_merged_model(tmp_path, tiny_llama_dir, trained_adapter):
    from transformers import AutoModelForCausalLM

    tokenizer, adapter_dir, expected, new_id = trained_adapter
    out = merge_adapter(str(tiny_llama_dir), adapter_dir, tmp_path / "merged", tokenizer, "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(model.lm_head.weight.float(), expected["model.embed_tokens.weight"].bfloat16().float())
    ids = torch.tensor([[1, 2, new_id, 3]])
    assert model(input_ids=ids).logits.shape == (1, 4, len(tokenizer))


def test_small_shards_and_unsupported_adapters(tmp_path, tiny_llama_dir, trained_adapter, monkeypatch):
    import training.export.merge as merge

    tokenizer, adapter_dir, expected, _ = trained_adapter
    monkeypatch.setattr(merge, "MAX_SHARD_BYTES", 200_000)  # many shards + an index, as a 3B model gets
    out = merge_adapter(str(tiny_llama_dir), adapter_dir, tmp_path / "sharded", tokenizer, "float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not list(out.glob("*.tmp"))
    got = _saved_tensors(out)
    assert set(got) == set(index["weight_map"])
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj.weight"], expected["model.layers.1.mlp.down_proj.weight"])

    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert read_adapter(dora) == ({}, "DoRA, no adapter_model.safetensors")
