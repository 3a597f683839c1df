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


# ---------------------------------------------------------------- issue 22: what the merge must reproduce exactly

def _random_adapter(model_dir, out_dir, targets, tokenizer=None, token_ids=None):
    """A LoRA adapter on `model_dir` with random non-zero weights (B starts at zero otherwise), saved to `out_dir`;
    returns the peft model itself: base + adapter, unmerged, the reference every merge must equal."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM",
                                             trainable_token_indices=token_ids))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    model.save_pretrained(out_dir)
    return model.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("base, targets, merge", [
    ("tiny_llama_dir", ["q_proj", "v_proj", "lm_head"], "merge_adapter"),
    ("tiny_llama_dir", ["q_proj", "v_proj", "lm_head"], "merge_adapter_in_memory"),
    ("tiny_llama_dir", ["embed_tokens"], "merge_adapter"),            # a LoRA embedding: peft's merge, untied
    ("tiny_gpt2_dir", ["c_attn", "lm_head"], "merge_adapter"),        # DialoGPT: Conv1D and Linear in one adapter
])
def test_lora_on_a_tied_lm_head_or_embedding_merges_to_base_plus_adapter(request, tmp_path, base, targets, merge):
    """SmolLM2 / Llama-3.2 / DialoGPT tie lm_head to the embeddings: LoRA on either trains an output layer that
    differs from the inputs. Adding it into the shared matrix (peft's merge) changed the inputs too; the merged model
    is untied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import training.export.merge as merging

    base = request.getfixturevalue(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    reference = _random_adapter(base, tmp_path / "adapter", targets)
    out = getattr(merging, merge)(str(base), tmp_path / "adapter", tmp_path / "merged", tokenizer, "float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = [5, 17, 300, 4000, 12]
    torch.testing.assert_close(_logits(merged, ids), _logits(reference, ids), rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    saved, before = _saved_tensors(out), _saved_tensors(base)
    embedding = next(name for name in before if name.endswith(("embed_tokens.weight", "wte.weight")))
    assert {"lm_head.weight", embedding} <= set(saved)
    changed = "lm_head.weight" if "lm_head" in targets else embedding
    unchanged = ({"lm_head.weight", embedding} - {changed}).pop()
    torch.testing.assert_close(saved[unchanged], before[embedding], rtol=0, atol=0)
    assert not torch.allclose(saved[changed], before[embedding])


def test_tied_lm_head_lora_with_new_token_rows(tmp_path, tiny_llama_dir):
    """Tied base, LoRA on lm_head and the template's new token rows (peft nests them: LoRA(token rows(lm_head))):
    both merges write the rows first, then B @ A, into an lm_head of its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.export.merge import merge_adapter_in_memory

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new_turn|>"]}, replace_extra_special_tokens=False)
    new_id = tokenizer.convert_tokens_to_ids("<|new_turn|>")
    reference = _random_adapter(tiny_llama_dir, tmp_path / "adapter", ["q_proj", "lm_head"], tokenizer, [new_id])
    ids = [5, 17, new_id, 300, new_id]
    for merge in (merge_adapter, merge_adapter_in_memory):
        out = merge(str(tiny_llama_dir), tmp_path / "adapter", tmp_path / merge.__name__, tokenizer, "float32")
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        torch.testing.assert_close(_logits(merged, ids), _logits(reference, ids), rtol=0, atol=1e-5, msg=merge.__name__)


def test_gguf_of_an_untied_merge_reads_both_matrices(tmp_path, tiny_llama_dir):
    """The untied merge exports to GGUF (output.weight beside token_embd.weight) and llama.cpp computes its logits."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbot.backends.llama_cpp import extra_buffers
    from training.export.gguf import export_gguf

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    _random_adapter(tiny_llama_dir, tmp_path / "adapter", ["lm_head"])
    out = merge_adapter(str(tiny_llama_dir), tmp_path / "adapter", tmp_path / "merged", tokenizer, "float32")
    (f32,) = export_gguf(out, tmp_path / "gguf", ["f32"], progress=False, threads=1)
    ids = [5, 17, 300, 4000, 12]
    expected = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)[-1].numpy()
    with extra_buffers(False):
        llm = llama_cpp.Llama(model_path=str(f32), n_ctx=64, n_threads=1, verbose=False)
        llm.eval(ids)
        got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_a_reused_output_folder_keeps_no_file_of_the_earlier_merge(tmp_path, tiny_llama_dir, trained_adapter,
                                                                   monkeypatch):
    """A sharded merge after a single-file one (and back): transformers prefers an old model.safetensors over a new
    index, so a leftover would be what loads; the folder must hold exactly the new merge."""
    from transformers import AutoModelForCausalLM

    import training.export.merge as merging

    tokenizer, adapter_dir, expected, _ = trained_adapter
    out = tmp_path / "merged"
    merge_adapter(str(tiny_llama_dir), adapter_dir, out, tokenizer, "bfloat16")
    (out / "stray-from-an-older-kit.bin").write_text("x")
    assert (out / "model.safetensors").is_file()
    monkeypatch.setattr(merging, "MAX_SHARD_BYTES", 2_000_000)
    merge_adapter(str(tiny_llama_dir), adapter_dir, out, tokenizer, "float32")
    weights = sorted(p.name for p in out.iterdir() if "safetensors" in p.name or p.suffix == ".bin")
    assert "model.safetensors" not in weights and "stray-from-an-older-kit.bin" not in weights
    assert "model.safetensors.index.json" in weights and len(weights) > 2
    assert not list(tmp_path.glob("merged.*"))  # no partial / old folder left beside it
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32  # the new merge, not the earlier bf16 file
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight,
                               expected["model.layers.0.self_attn.q_proj.weight"])
    monkeypatch.setattr(merging, "MAX_SHARD_BYTES", 1 << 30)
    merging.merge_adapter_in_memory(str(tiny_llama_dir), adapter_dir, out, tokenizer, "bfloat16")
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]


def test_untied_base_with_a_grown_vocabulary_trains_and_merges_the_new_lm_head_row(tmp_path, smollm2_tokenizer_dir):
    """Llama-3.1-8B / Mistral / Qwen2.5-7B keep lm_head apart from the embeddings: the template's new end-of-turn
    token must get a trained lm_head row (or the model cannot learn to stop), and the merge must carry both rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.config import LoraSection, ModelConfig
    from training.trainer.modeling import load_model_for_training
    from training.trainer.shapes import build_tiny_checkpoint

    base = build_tiny_checkpoint("tiny-llama-untied", AutoTokenizer.from_pretrained(smollm2_tokenizer_dir),
                                 tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end_turn|>"]}, replace_extra_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|end_turn|>")
    model = load_model_for_training(str(base), ModelConfig(gradient_checkpointing=False),
                                    LoraSection(r=4, target_modules=["q_proj", "v_proj"]), "fp32", tokenizer, [end])
    head = model.get_output_embeddings()
    before = model(input_ids=torch.tensor([[1]])).logits[0, -1, end].item()
    row_before = head.weight[end].detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[5, 17, 300, end, 5, 17, 300, end]])
    for _ in range(3):  # learn to predict the end-of-turn token
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    after = model(input_ids=torch.tensor([[1]])).logits[0, -1, end].item()
    assert after != pytest.approx(before, abs=1e-3)
    merged_rows = dict(model.get_output_embeddings().token_adapter.trainable_tokens_delta)
    assert merged_rows, "lm_head has trainable token rows"
    assert not torch.allclose(merged_rows["default"][0], row_before)
    model.save_pretrained(tmp_path / "adapter")

    out = merge_adapter(str(base), tmp_path / "adapter", tmp_path / "merged", tokenizer, "float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    probe = [5, 17, 300, end, 9]
    torch.testing.assert_close(_logits(merged, probe), _logits(model, probe), rtol=0, atol=1e-5)
    saved = _saved_tensors(out)
    torch.testing.assert_close(saved["lm_head.weight"][end], merged_rows["default"][0].detach(), rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("option", [{"init_lora_weights": "pissa"}, {"init_lora_weights": "pissa_niter_4"},
                                    {"init_lora_weights": "olora"}, {"init_lora_weights": "corda"},
                                    {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}},
                                    {"lora_ga_config": {"direction": "ArB2r"}}])
def test_adapters_that_changed_their_base_at_init_are_refused(tmp_path, tiny_llama_dir, trained_adapter, option):
    from training.export.merge import MergeError, merge_adapter_in_memory

    tokenizer, adapter_dir, _, _ = trained_adapter
    changed = tmp_path / "adapter"
    changed.mkdir()
    (changed / "adapter_model.safetensors").symlink_to(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (changed / "adapter_config.json").write_text(json.dumps({**config, **option}))
    for merge in (merge_adapter, merge_adapter_in_memory):
        with pytest.raises(MergeError, match=r"changes the base weights: merged into the original base it is not the "
                                             r"model trained") as exc:
            merge(str(tiny_llama_dir), changed, tmp_path / "merged", tokenizer, "float32")
        assert "\n" not in str(exc.value) and not (tmp_path / "merged").exists()


def test_a_pre_quantized_base_is_refused(tmp_path, tiny_llama_dir, trained_adapter):
    import shutil

    from training.export.merge import MergeError

    tokenizer, adapter_dir, _, _ = trained_adapter
    base = tmp_path / "fp8-base"
    shutil.copytree(tiny_llama_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"the base is quantized \(quantization_config\.quant_method=fp8\)"):
        merge_adapter(str(base), adapter_dir, tmp_path / "merged", tokenizer, "float32")
    assert not (tmp_path / "merged").exists()
