"""The hardware decision over a table of real devices: precision, 4-bit dtypes, attention, packing, Liger and
optimizer on CPU, T4, V100, A10G, L4, A100 and H100, and the overrides that win or fail with one line. Packing is
checked against what each architecture really does with a packed row (tiny Llama, Qwen2, GPT-2, OPT, Bloom, MPT,
LFM2), and the bases/recipes the merge could not reproduce are refused before anything runs."""
from __future__ import annotations

import pytest
import torch

from training.trainer.hardware import Device, PlanError, Request, decide
from training.trainer.packing_check import packing_checks
from training.trainer.shapes import build_random_model, shape_config

ALL = frozenset({"bitsandbytes", "flash_attn", "liger_kernel"})
BNB = frozenset({"bitsandbytes"})

# name, capability, memory (GiB as torch reports it)
DEVICES = {
    "cpu": Device(name="cpu", memory_gib=24, count=2),
    "T4": Device(name="Tesla T4", capability=(7, 5), memory_gib=14.7),
    "V100-16": Device(name="Tesla V100-SXM2-16GB", capability=(7, 0), memory_gib=15.8),
    "V100-32": Device(name="Tesla V100-SXM2-32GB", capability=(7, 0), memory_gib=31.7),
    "A10G": Device(name="NVIDIA A10G", capability=(8, 6), memory_gib=22.1),
    "L4": Device(name="NVIDIA L4", capability=(8, 9), memory_gib=22.2),
    "A100-40": Device(name="NVIDIA A100-SXM4-40GB", capability=(8, 0), memory_gib=39.4),
    "A100-80": Device(name="NVIDIA A100-SXM4-80GB", capability=(8, 0), memory_gib=79.2),
    "H100": Device(name="NVIDIA H100 80GB HBM3", capability=(9, 0), memory_gib=79.1),
}

# What the reference recipe (llama-3.2-1b-finetome: mode auto, adamw_8bit, packing, Liger) gets on each device
# with requirements-train + requirements-gpu + flash-attn installed:
#   device: (mode, precision, bnb compute dtype, attention, liger, optim, tf32)
EXPECTED = {
    "cpu": ("fp32", "fp32", None, "default", False, "adamw_8bit", False),
    "T4": ("qlora", "fp16", "float16", "default", False, "adamw_8bit", False),
    "V100-16": ("qlora", "fp16", "float16", "default", False, "adamw_8bit", False),
    "V100-32": ("qlora", "fp16", "float16", "default", False, "adamw_8bit", False),
    "A10G": ("qlora", "bf16", "bfloat16", "flash_attention_2", True, "adamw_8bit", True),
    "L4": ("qlora", "bf16", "bfloat16", "flash_attention_2", True, "adamw_8bit", True),
    "A100-40": ("qlora", "bf16", "bfloat16", "flash_attention_2", True, "adamw_8bit", True),
    "A100-80": ("qlora", "bf16", "bfloat16", "flash_attention_2", True, "adamw_8bit", True),
    "H100": ("qlora", "bf16", "bfloat16", "flash_attention_2", True, "adamw_8bit", True),
}

# Model facts as modeling.plan_training measures them for a Llama base (packing checked on a toy copy).
LLAMA_FACTS = dict(model_type="llama", tied_embeddings=True,
                   attention_support=frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2",
                                                "flash_attention_3", "flash_attention_4"}),
                   packing_checks=packing_checks(shape_config("tiny-llama"), ["default", "flash"]))
RECIPE = Request(mode="auto", packing=True, liger=True, optim="adamw_8bit", **LLAMA_FACTS)


def _with(device: Device, packages=ALL) -> Device:
    return Device(device.name, device.capability, device.memory_gib, frozenset(packages), device.count,
                  frozenset({"llama", "qwen2", "mistral"}))


@pytest.mark.parametrize("name", DEVICES)
def test_reference_recipe_on_each_device(name):
    plan = decide(_with(DEVICES[name]), RECIPE)
    got = (plan.mode, plan.precision, plan.bnb_compute_dtype, plan.attention, plan.liger, plan.optim, plan.tf32)
    assert got == EXPECTED[name]
    assert plan.packing  # every attention path chosen here splits packed rows by position_ids
    assert plan.trainable_dtype == "float32"
    # Unquantised weights (embeddings, norms, lm_head) in the compute dtype: never bf16 where it is emulated.
    assert plan.weights_dtype == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[plan.precision]
    assert set(plan.reasons) == {"mode", "precision", "attention", "packing", "liger", "optim"}


@pytest.mark.parametrize("name", ["T4", "V100-16", "V100-32"])
def test_no_bf16_before_ampere_even_when_asked_for_16_bit_lora(name):
    """torch.cuda.is_bf16_supported() answers True on sm75/sm70 through emulation; the plan must not believe it."""
    for mode in ("auto", "qlora", "lora"):
        plan = decide(_with(DEVICES[name]), Request(mode=mode))
        assert plan.precision == "fp16" and "bfloat16" not in (plan.weights_dtype, plan.bnb_compute_dtype)
        assert "no native bf16" in plan.reasons["precision"]


def test_liger_off_on_pre_ampere_and_cpu_with_reason():
    assert "sm75" in decide(_with(DEVICES["T4"]), RECIPE).reasons["liger"]
    assert "CUDA" in decide(_with(DEVICES["cpu"]), RECIPE).reasons["liger"]
    plan = decide(_with(DEVICES["H100"], {"bitsandbytes"}), RECIPE)
    assert not plan.liger and "not installed" in plan.reasons["liger"]


def test_liger_off_when_new_token_rows_train():
    """Liger's fused loss multiplies by lm_head.weight itself: peft's trainable token rows (tied to the input
    embedding, or lm_head's own rows on an untied base) would be skipped in training but present after the merge."""
    h100 = _with(DEVICES["H100"])
    for tied in (True, False):
        grown = Request(mode="auto", liger=True, model_type="llama", new_token_rows=3, tied_embeddings=tied)
        plan = decide(h100, grown)
        assert not plan.liger and "3 token rows" in plan.reasons["liger"] and "lm_head.weight" in plan.reasons["liger"]
    assert decide(h100, Request(mode="auto", liger=True, model_type="llama")).liger
    on_head = decide(h100, Request(mode="auto", liger=True, model_type="llama", lora_on_lm_head=True))
    assert not on_head.liger and "lm_head" in on_head.reasons["liger"]
    other = decide(h100, Request(mode="auto", liger=True, model_type="gpt_neo"))
    assert not other.liger and "gpt_neo" in other.reasons["liger"]


def test_flash_attention_needs_ampere_install_and_16_bit():
    assert decide(_with(DEVICES["A10G"], BNB), RECIPE).attention == "default"  # not installed: sdpa
    assert decide(_with(DEVICES["T4"]), RECIPE).attention == "default"        # installed, but sm75
    assert decide(_with(DEVICES["H100"]), Request(mode="fp32")).attention == "default"  # no fp32 kernels
    with pytest.raises(PlanError, match=r"flash_attention_2 needs an Ampere.*Tesla T4 \(sm75"):
        decide(_with(DEVICES["T4"]), Request(attention="flash_attention_2"))
    with pytest.raises(PlanError, match="pip install flash-attn"):
        decide(_with(DEVICES["A100-40"], BNB), Request(attention="flash_attention_2"))
    assert decide(_with(DEVICES["T4"]), Request(attention="eager")).attention == "eager"


def _packed_row_keeps_conversations_apart(model) -> bool:
    """The behaviour itself, on the full tiny model: the training collator's packed row vs each conversation alone."""
    from training.trainer.packing import make_packing_collator

    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 250, (n,), generator=generator).tolist() for n in (7, 3, 11)]
    batch = make_packing_collator()([{"input_ids": r, "labels": r} for r in rows])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits[0] for r in rows])
    return (packed - alone).abs().max().item() < 1e-5


# OPT builds its mask (and learned positions) without the restarting position_ids, Bloom and MPT their ALiBi masks,
# and LFM2's short convolutions mix the last tokens of one conversation into the next: packing must be off for them.
PACKS = {"tiny-llama": True, "tiny-qwen2": True, "tiny-gpt2": True, "tiny-opt": False, "tiny-bloom": False,
         "tiny-mpt": False, "tiny-lfm2": False}


@pytest.mark.parametrize("shape", PACKS)
def test_packing_follows_what_the_architecture_does(shape):
    from training.config import TrainConfig
    from training.trainer.modeling import plan_training
    from training.trainer.progress import plan_lines

    model = build_random_model(shape, vocab_size=256).eval()
    model.config.use_cache = False
    keeps_apart = _packed_row_keeps_conversations_apart(model)
    assert keeps_apart is PACKS[shape]  # the architecture's real behaviour (not a table restated)
    cfg = TrainConfig()
    cfg.train.packing = True
    plan = plan_training(cfg, config=model.config, device=_with(DEVICES["cpu"]))
    assert plan.packing is keeps_apart
    line = next(line for line in plan_lines(plan) if line.startswith("packing"))  # what the run prints
    assert (f"packing    {'on' if keeps_apart else 'off'}: checked on a toy {model.config.model_type}" in line
            and ("differ from its conversations alone" in line) is not keeps_apart), line


def test_packing_needs_a_check_for_the_attention_it_runs():
    plan = decide(_with(DEVICES["H100"]), RECIPE)
    assert plan.packing and "varlen kernel" in plan.reasons["packing"]
    assert "block-diagonal" in decide(_with(DEVICES["T4"]), RECIPE).reasons["packing"]
    unchecked = decide(_with(DEVICES["H100"]), Request(packing=True, attention="flex_attention", **LLAMA_FACTS))
    assert not unchecked.packing and "not checked" in unchecked.reasons["packing"]
    assert not decide(_with(DEVICES["H100"]), Request(packing=True, attention="paged_attention")).packing
    assert not decide(_with(DEVICES["H100"]), Request(packing=True)).packing  # no model facts: not known to pack
    assert not decide(_with(DEVICES["H100"]), Request(packing=True, remote_code=True)).packing
    assert not decide(_with(DEVICES["H100"]), Request(packing=False)).packing


def test_packing_with_flash_attention_is_checked_on_its_own_path():
    """OPT's mask ignores packed position_ids, but it hands them (and the collator's cu_seq_lens) to its attention
    call: under flash-attention's varlen kernel it packs correctly; Bloom does not support flash-attention at all."""
    from training.config import TrainConfig
    from training.trainer.modeling import plan_training

    cfg = TrainConfig()
    cfg.train.packing = True
    h100 = _with(DEVICES["H100"])
    opt = plan_training(cfg, config=shape_config("tiny-opt"), device=h100)
    assert (opt.attention, opt.packing) == ("flash_attention_2", True) and "varlen" in opt.reasons["packing"]
    bloom = plan_training(cfg, config=shape_config("tiny-bloom"), device=h100)
    assert bloom.attention == "default" and "no flash-attention path for bloom" in bloom.reasons["attention"]
    assert not bloom.packing


def test_flash_attention_refused_where_the_model_or_gpu_has_none():
    h100, a100 = _with(DEVICES["H100"]), _with(DEVICES["A100-80"])
    bloom = dict(model_type="bloom", attention_support=frozenset({"eager"}))
    with pytest.raises(PlanError, match=r"model\.attn_implementation=flash_attention_2 is not implemented for bloom "
                                        r"models in transformers; accepted for this model: eager"):
        decide(h100, Request(attention="flash_attention_2", **bloom))
    with pytest.raises(PlanError, match=r"attn_implementation=sdpa is not implemented for bloom"):
        decide(h100, Request(attention="sdpa", **bloom))
    for fa in ("flash_attention_3", "flash_attention_4"):
        with pytest.raises(PlanError, match=rf"{fa} needs a Hopper or newer GPU \(sm90\+\).*sm80.*flash_attention_2"):
            decide(a100, Request(attention=fa, **LLAMA_FACTS))
        assert decide(h100, Request(attention=fa, **LLAMA_FACTS)).attention == fa


def test_bases_and_recipes_the_merge_could_not_reproduce_are_refused():
    cpu = _with(DEVICES["cpu"])
    for method in ("bitsandbytes", "fp8"):
        with pytest.raises(PlanError, match=rf"already quantized \(quantization_config\.quant_method={method}\).*"
                                            r"unquantized original") as exc:
            decide(cpu, Request(quantized=method, **{**LLAMA_FACTS, "tied_embeddings": False}))
        assert "\n" not in str(exc.value)
    with pytest.raises(PlanError, match=r"lora\.target_modules includes the input embeddings while the chat template "
                                        r"adds 2 tokens"):
        decide(cpu, Request(lora_on_embeddings=True, new_token_rows=2, **LLAMA_FACTS))
    assert decide(cpu, Request(lora_on_embeddings=True, **LLAMA_FACTS)).mode == "fp32"  # no new rows: fine


def test_plan_training_reads_the_refusals_from_the_base(tmp_path):
    """modeling.plan_training fills the Request from the base's config.json: a pre-quantized checkpoint and LoRA on
    an embedding the template grows are refused from the files alone, before a weight is loaded."""
    import json

    from training.config import TrainConfig
    from training.trainer.modeling import plan_training

    config = shape_config("tiny-llama-untied", vocab_size=256)
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="quant_method=fp8"):
        plan_training(TrainConfig(), str(tmp_path), device=_with(DEVICES["cpu"]))
    cfg = TrainConfig()
    cfg.lora.target_modules = ["q_proj", "embed_tokens"]
    with pytest.raises(PlanError, match="drop the embedding layer from lora.target_modules"):
        plan_training(cfg, config=config, new_token_ids=[254, 255], device=_with(DEVICES["cpu"]))


def test_cpu_qlora_runs_with_fp32_compute_and_unpaged_8bit_adamw():
    plan = decide(_with(DEVICES["cpu"], BNB), Request(mode="qlora", optim="paged_adamw_8bit"))
    assert (plan.mode, plan.precision, plan.bnb_compute_dtype, plan.weights_dtype) == \
        ("qlora", "fp32", "float32", "float32")
    assert plan.optim == "adamw_8bit" and "CUDA" in plan.reasons["optim"]
    assert decide(_with(DEVICES["T4"], BNB), Request(optim="paged_adamw_8bit")).optim == "paged_adamw_8bit"
    no_bnb = decide(_with(DEVICES["cpu"], ()), Request(optim="adamw_8bit"))
    assert no_bnb.optim == "adamw_torch" and "bitsandbytes" in no_bnb.reasons["optim"]


def test_auto_mode_without_bitsandbytes_is_16_bit_lora_on_gpu_fp32_on_cpu():
    assert decide(_with(DEVICES["L4"], ()), Request()).mode == "lora"
    assert decide(_with(DEVICES["L4"], ()), Request()).weights_dtype == "bfloat16"
    assert decide(_with(DEVICES["T4"], ()), Request()).weights_dtype == "float16"
    assert decide(_with(DEVICES["cpu"], BNB), Request()).mode == "fp32"


def test_overrides_win_or_fail_with_one_line():
    t4, cpu = _with(DEVICES["T4"]), _with(DEVICES["cpu"])
    forced = decide(t4, Request(precision="bf16"))
    assert forced.precision == "bf16" and "emulated" in forced.reasons["precision"]
    assert decide(_with(DEVICES["H100"]), Request(precision="fp16")).precision == "fp16"
    assert decide(_with(DEVICES["H100"]), Request(mode="fp32")).precision == "fp32"
    assert decide(_with(DEVICES["H100"]), Request(mode="bf16")).mode == "lora"  # the older name of 16-bit LoRA
    assert decide(t4, Request(mode="bf16")).precision == "bf16"
    for device, req, match in [
        (cpu, Request(precision="fp16"), r"model\.precision=fp16 needs a CUDA GPU"),
        (_with(DEVICES["cpu"], ()), Request(mode="qlora"), r"model\.mode=qlora needs bitsandbytes: pip install"),
        (t4, Request(mode="bf16", precision="fp16"), r"use model\.mode=lora with model\.precision=fp16"),
        (t4, Request(mode="gpu"), r"model\.mode='gpu' is not valid; accepted: auto, qlora"),
    ]:
        with pytest.raises(PlanError, match=match) as exc:
            decide(device, req)
        assert "\n" not in str(exc.value)


def test_default_attention_is_named_once_the_model_is_loaded():
    plan = decide(_with(DEVICES["T4"]), RECIPE)
    assert plan.attn_implementation is None  # from_pretrained keeps the architecture's default
    assert plan.with_attention("sdpa").attention == "sdpa"
    flash = decide(_with(DEVICES["H100"]), RECIPE)
    assert flash.attn_implementation == "flash_attention_2" and flash.with_attention("sdpa") == flash


def test_probe_describes_this_machine():
    from training.trainer.hardware import probe

    device = probe()
    assert device.cuda == __import__("torch").cuda.is_available()
    assert device.memory_gib > 0 and "bitsandbytes" in device.packages  # requirements-train installs it
    plan = decide(device, Request())
    assert plan.device == device.describe()


def test_a_t4_plan_reaches_the_trainer_and_the_model(tmp_path, tiny_qwen2_dir):
    """finetune and modeling follow the plan, not the machine: a T4 plan built here trains fp16 with loss scaling,
    4-bit matmuls in fp16, frozen weights in fp16 and every trainable tensor in fp32 (the GradScaler refuses fp16
    gradients) - including the biases lora.bias=all trains, which peft leaves in the base's dtype."""
    import torch
    from transformers import AutoTokenizer

    from training.config import LoraSection, ModelConfig, TrainConfig
    from training.finetune import training_arguments
    from training.trainer.modeling import load_model_for_training

    t4 = _with(DEVICES["T4"], BNB)
    cfg = TrainConfig()
    cfg.train.output_dir, cfg.train.report_to, cfg.train.optim = str(tmp_path), "none", "adamw_8bit"
    args = training_arguments(cfg, decide(t4, Request(optim="adamw_8bit")), has_eval=False)
    assert (args.fp16, args.bf16, args.optim.value) == (True, False, "adamw_8bit")

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    for mode in ("lora", "qlora"):
        plan = decide(t4, Request(mode=mode))
        model = load_model_for_training(str(tiny_qwen2_dir), ModelConfig(gradient_checkpointing=False),
                                        LoraSection(r=4, bias="all"), plan, tok)
        trainable = {p.dtype for p in model.parameters() if p.requires_grad}
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        assert trainable == {torch.float32} and frozen == {torch.float16}, (mode, trainable, frozen)
        if mode == "qlora":
            q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
            assert type(q_proj).__name__ == "Linear4bit" and q_proj.compute_dtype == torch.float16
