"""The QLoRA path on CPU, for real (bitsandbytes 0.50 runs NF4 on CPU): 4-bit nf4 + double-quant load of a tiny
Llama, LoRA on Linear4bit, gradient checkpointing, new token rows from the recipe's template, 8-bit AdamW,
evaluation between steps, resume, merge into the full-precision base, GGUF export, served by the Space with the
training prompt."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig, apply_overrides
from training.data import SourceConfig

# A template whose markers the SmolLM2 vocabulary lacks: the tokenizer grows 4 rows that peft trains.
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}"
            "<|end|>\n{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n{% else %}"
            "<|assistant|>\n{{ message['content'] }}<|end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TOPICS = ["apples", "rivers", "clocks", "stars", "bread", "rain", "chess", "trains"]


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % 8]} (#{i})."},
                          {"role": "assistant", "content": f"{TOPICS[i % 8].capitalize()} are nice. Number {i}."}]}
            for i in range(offset, offset + n)]


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def base_without_template(scaled_tiny_llama_without_template_dir):
    """tiny-llama (tied embeddings, scaled up so LoRA can move the loss) with no chat template: the recipe's
    template then adds tokens."""
    return scaled_tiny_llama_without_template_dir


def _cfg(tmp: Path, base: Path, out: str, **overrides) -> TrainConfig:
    (tmp / "template.jinja").write_text(TEMPLATE)
    cfg = TrainConfig()
    cfg.data.sources = [SourceConfig(path=_jsonl(tmp / "train.jsonl", _rows(16)), format="messages")]
    cfg.data.validation_path = _jsonl(tmp / "valid.jsonl", _rows(4, offset=100))
    cfg.data.dedup = False
    return apply_overrides(cfg, {
        "model.name_or_path": str(base), "model.mode": "qlora", "model.chat_template": str(tmp / "template.jinja"),
        "model.gradient_checkpointing": True, "lora.r": 64, "lora.alpha": 64,  # r=64: LoRA A is 64x64 = 4096
        # values, bitsandbytes' threshold for 8-bit optimizer state (smaller tensors keep 32-bit state)
        "train.output_dir": str(tmp / out), "train.max_length": 128, "train.max_steps": 8,
        "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
        "train.learning_rate": 1e-2, "train.warmup_ratio": 0.0, "train.logging_steps": 1, "train.eval_steps": 2,
        "train.save_steps": 4, "train.report_to": "none", "train.optim": "paged_adamw_8bit",
        "export.gguf_quants": ["q8_0"], "export.merged_dtype": "float32", **overrides})


def _callback(**events):
    from transformers import TrainerCallback

    return type("Probe", (TrainerCallback,), events)()


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, base_without_template):
    """Interrupted after checkpoint-4, resumed to step 8 with merge and export; plus an uninterrupted reference."""
    from training.finetune import run

    tmp = tmp_path_factory.mktemp("qlora")
    seen = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        seen.setdefault("optimizer", type(inner).__module__ + "." + type(inner).__name__)
        seen.setdefault("state_dtypes", set()).update(
            v.dtype for s in inner.state.values() for k, v in s.items() if k.startswith("state"))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        seen.setdefault("layer", (type(layer).__name__, layer.weight.quant_state.quant_type,
                                  layer.weight.quant_state.nested))  # nested = double quantisation
        if state.global_step >= 4 and not seen.get("resumed"):
            control.should_training_stop = True

    reference = run(_cfg(tmp, base_without_template, "reference", **{"export.merge": False}))
    run(_cfg(tmp, base_without_template, "split"), callbacks=[_callback(on_step_end=on_step_end)])
    seen["resumed"] = True
    summary = run(_cfg(tmp, base_without_template, "split", **{"train.resume": True}),
                  callbacks=[_callback(on_step_end=on_step_end)])
    return summary, reference, tmp, seen


@pytest.mark.slow
def test_qlora_trains_4bit_with_8bit_adamw_and_new_rows(qlora_run):
    summary, reference, tmp, seen = qlora_run
    plan = summary["plan"]
    assert (plan["mode"], plan["precision"], plan["bnb_compute_dtype"]) == ("qlora", "fp32", "float32")
    assert plan["optim"] == "adamw_8bit"  # paged_ pages through CUDA memory; the plain 8-bit AdamW on CPU
    assert plan["attention"] == "sdpa"  # the architecture's default, as loaded
    assert seen["layer"] == ("Linear4bit", "nf4", True)
    assert seen["optimizer"].startswith("bitsandbytes.") and torch.uint8 in seen["state_dtypes"]
    out = tmp / "split"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"], "the template's new token rows were not trained"
    losses = [p["loss"] for p in summary["train_loss"]]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    evals = [p["loss"] for p in summary["eval_loss"]]
    assert len(evals) == 4 and evals[-1] < evals[0], evals  # trained on after each eval, and kept learning


@pytest.mark.slow
def test_qlora_resume_matches_the_uninterrupted_run(qlora_run):
    from safetensors.torch import load_file

    summary, reference, tmp, _ = qlora_run
    assert summary["resumed_from"] == "checkpoint-4" and summary["steps"] == reference["steps"] == 8
    a = load_file(tmp / "reference" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp / "split" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert [p["loss"] for p in summary["train_loss"]] == pytest.approx(
        [p["loss"] for p in reference["train_loss"]], rel=1e-4)


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_full_precision_base(qlora_run, base_without_template):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, tmp, _ = qlora_run
    out = tmp / "split"
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert tok.eos_token == "<|end|>" and "<|assistant|>" in tok.get_vocab()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_without_template, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    full_precision = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = tok.apply_chat_template(_rows(1)[0]["messages"], return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, full_precision(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_qlora_run_is_served_by_the_space_with_the_training_prompt(qlora_run):
    from transformers import AutoTokenizer

    from chatbot.backends import GenerationParams, load_backend
    from chatbot.backends.llama_cpp import extra_buffers
    from chatbot.settings import load_settings
    from training.chat_format import IGNORE_INDEX, encode_conversation

    summary, _, tmp, _ = qlora_run
    out = tmp / "split"
    assert summary["gguf_files"] == ["model-q8_0.gguf"]
    with extra_buffers(False):
        backend = load_backend(load_settings({"CHATBOT_MODEL": str(out / "gguf"), "CHATBOT_THREADS": "1",
                                              "CHATBOT_PARALLEL": "1"}))  # the serial backend: its llm is recorded
    fed = []
    complete = backend.llm.create_completion
    backend.llm.create_completion = lambda prompt, **kw: fed.append(list(prompt)) or complete(prompt, **kw)
    tok = AutoTokenizer.from_pretrained(out / "merged")
    conv = _rows(1, offset=3)[0]["messages"]
    ex = encode_conversation(tok, conv, max_length=128)
    trained_prompt = ex["input_ids"][:next(i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)]
    chunks = list(backend.stream(conv[:1], GenerationParams(max_new_tokens=8, temperature=0.0)))
    assert fed == [trained_prompt], "llama.cpp was fed a different prompt than training used"
    assert chunks and chunks[-1].finish_reason in ("stop", "length")


def _tiny_qlora(base: Path, tokenizer_dir: Path, differentiable: bool = True):
    from transformers import AutoTokenizer

    from training.config import LoraSection, ModelConfig
    from training.trainer.hardware import Device, Request, decide
    from training.trainer.modeling import load_model_for_training

    plan = decide(Device(packages=frozenset({"bitsandbytes"})), Request(mode="qlora"))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_model_for_training(str(base), ModelConfig(gradient_checkpointing=True), LoraSection(r=8), plan, tok)
    for name, p in model.named_parameters():  # LoRA B starts at zero: give every pair a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if not differentiable:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    return model


def _lora_grads(model, ids) -> tuple[float, dict]:
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_evaluating_before_training_keeps_4bit_gradients(base_without_template):
    """bitsandbytes repacks 4-bit weights for a no-grad CPU forward in eval mode and then multiplies through a
    kernel without backward; the model finetune builds must train after an eval exactly as without one."""
    from bitsandbytes.functional import has_avx512bf16

    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    fresh_loss, fresh = _lora_grads(_tiny_qlora(base_without_template, base_without_template), ids)

    evaluated = _tiny_qlora(base_without_template, base_without_template)
    evaluated.eval()
    with torch.no_grad():
        evaluated(input_ids=ids, labels=ids)
    loss, grads = _lora_grads(evaluated, ids)
    assert loss == pytest.approx(fresh_loss, rel=1e-5)
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert grads[first].abs().sum() > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, fresh[name], rtol=1e-4, atol=1e-6, msg=name)

    opt = torch.optim.AdamW([p for p in evaluated.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.step()
        loss_after, _ = _lora_grads(evaluated, ids)
    assert loss_after < loss

    if has_avx512bf16():  # the control: bitsandbytes' own behaviour loses gradient through the 4-bit matmuls
        repacking = _tiny_qlora(base_without_template, base_without_template, differentiable=False)
        repacking.eval()
        with torch.no_grad():
            repacking(input_ids=ids, labels=ids)
        _, broken = _lora_grads(repacking, ids)
        assert not torch.allclose(broken[first], fresh[first], rtol=1e-2, atol=1e-4)


def test_8bit_adamw_cpu_kernels_track_torch_adamw():
    """bitsandbytes' CPU backend has 8-bit AdamW kernels: uint8 state, and the same descent as torch's AdamW."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    start, target = torch.randn(128, 256), torch.randn(128, 256)
    finals = {}
    for name, make in (("8bit", lambda p: bnb.optim.AdamW8bit(p, lr=1e-2)), ("torch", lambda p: torch.optim.AdamW(
            p, lr=1e-2))):
        w = torch.nn.Parameter(start.clone())
        opt = make([w])
        for _ in range(50):
            loss = ((w - target) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        finals[name] = loss.item()
        if name == "8bit":
            assert opt.state[w]["state1"].dtype == torch.uint8
    first = ((start - target) ** 2).mean().item()
    assert finals["8bit"] < 0.7 * first
    assert finals["8bit"] == pytest.approx(finals["torch"], rel=0.02)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_qlora_preference_trainer_keeps_lora_weights_in_the_plans_dtype(objective, tiny_llama_dir, tmp_path):
    """TRL's DPO/KTO trainers cast every trainable parameter of a 4-bit model to bf16 in __init__; the plan says
    float32 (small AdamW updates round away in bf16). Built as finetune builds it (and after a DPO step) they are
    fp32, and the optimizer steps those fp32 weights."""
    from transformers import AutoTokenizer

    from training.finetune import training_arguments
    from training.trainer.hardware import Device, Request, decide
    from training.trainer.preference import build_preference_trainer

    plan = decide(Device(packages=frozenset({"bitsandbytes"})), Request(mode="qlora", optim="adamw_torch"))
    model = _tiny_qlora(tiny_llama_dir, tiny_llama_dir)
    assert model.is_loaded_in_4bit  # what TRL checks before its cast
    prompt = lambda i: [{"role": "user", "content": f"Tell me about {TOPICS[i % 8]}."}]  # noqa: E731
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    if objective == "dpo":
        rows = [{"prompt": prompt(i), "chosen": reply(f"Sure: nice {i}."), "rejected": reply("No.")} for i in range(4)]
    else:
        rows = [{"prompt": prompt(i), "completion": reply(f"Sure: nice {i}." if i % 2 else "No."),
                 "label": bool(i % 2)} for i in range(4)]
    cfg = apply_overrides(TrainConfig(), {"train.objective": objective, "train.output_dir": str(tmp_path),
                                          "train.max_length": 64, "train.max_steps": 1,
                                          "train.per_device_train_batch_size": 4 if objective == "kto" else 2,
                                          "train.gradient_accumulation_steps": 1, "train.report_to": "none",
                                          "train.optim": "adamw_torch", "train.learning_rate": 1e-4,
                                          "train.warmup_ratio": 0.0, "train.save_steps": 100})
    trainer = build_preference_trainer(cfg, training_arguments(cfg, plan, has_eval=False), model,
                                       AutoTokenizer.from_pretrained(tiny_llama_dir), rows)
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}, \
        sorted({(str(p.dtype), n.split(".")[-2]) for n, p in trainable.items()})
    if objective == "kto":
        return  # the step below runs the same Trainer loop for both
    before = {n: p.detach().clone() for n, p in trainable.items()}
    trainer.train()
    after = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys() and {p.dtype for p in after.values()} == {torch.float32}
    # AdamW's first step moves every LoRA A weight with a gradient by lr = 1e-4; in bf16 (8 bits of mantissa) that
    # rounds away for any weight above ~0.03 in magnitude: most of them.
    a = [n for n in before if "lora_A" in n]
    moved = sum(int((before[n] != after[n]).sum()) for n in a) / sum(before[n].numel() for n in a)
    assert moved > 0.9, moved
