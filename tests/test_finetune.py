"""End to end on CPU with a tiny random-weight Llama: training learns, outputs exist, merged model serves,
resume reproduces an uninterrupted run, the model card and upload plan are right."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import TrainConfig, apply_overrides, load_config
from training.data import SourceConfig

REPO = Path(__file__).resolve().parent.parent

TOPICS = ["apples", "rivers", "clocks", "stars", "bread", "rain", "chess", "trains"]


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({"messages": [
            {"role": "user", "content": f"Tell me about {topic} (#{i})."},
            {"role": "assistant", "content": f"{topic.capitalize()} are nice. Number {i}."},
        ]})
    return rows


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, model_dir, out: str, **overrides) -> TrainConfig:
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(16))
    valid = _write_jsonl(tmp_path / "valid.jsonl", _rows(4, offset=100))
    cfg = TrainConfig()
    cfg.data.sources = [SourceConfig(path=str(train), format="messages")]
    cfg.data.validation_path = str(valid)
    cfg.data.dedup = False
    base = {"model.name_or_path": str(model_dir), "model.mode": "fp32", "model.gradient_checkpointing": True,
            "lora.r": 8, "lora.alpha": 16, "train.output_dir": str(tmp_path / out), "train.max_length": 128,
            "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
            "train.learning_rate": 1e-2, "train.warmup_ratio": 0.0, "train.logging_steps": 1,
            "train.eval_steps": 8, "train.save_steps": 16, "train.report_to": "none", "train.optim": "adamw_torch",
            "export.gguf": False}
    return apply_overrides(cfg, {**base, **overrides})


@pytest.fixture(scope="module")
def tiny_model_dir(scaled_tiny_llama_dir):
    return scaled_tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    from training.finetune import run

    tmp = tmp_path_factory.mktemp("tiny-run")
    cfg = _cfg(tmp, tiny_model_dir, "out", **{"train.max_steps": 32, "export.merged_dtype": "float32"})
    summary = run(cfg)
    return cfg, summary, Path(cfg.train.output_dir)


@pytest.mark.slow
def test_tiny_run_learns_and_writes_every_output(tiny_run):
    cfg, summary, out = tiny_run
    for rel in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
                "merged/tokenizer_config.json", "summary.json", "loss.png", "config.yaml", "README.md",
                "data_report.json", "data_lengths.png", "checkpoint-16", "checkpoint-32"):
        assert (out / rel).exists(), rel
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 32
    losses = [p["loss"] for p in summary["train_loss"]]
    assert len(losses) >= 30
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses  # falls clearly
    evals = [p["loss"] for p in summary["eval_loss"]]
    assert len(evals) >= 4 and evals[-1] < evals[0]
    assert summary["final_eval_loss"] == pytest.approx(evals[-1])
    assert summary["peak_memory_gb"] > 0 and summary["wall_time_s"] > 0
    assert on_disk["config"]["lora"]["r"] == 8


@pytest.mark.slow
def test_tokens_per_second_counts_real_tokens_not_padding(tiny_run):
    """16 rows, batch 4, 32 steps = 8 full epochs: exactly 8x the unpadded length of the training set."""
    from transformers import AutoTokenizer

    from training.chat_format import encode_conversation

    cfg, summary, out = tiny_run
    tok = AutoTokenizer.from_pretrained(out / "merged")
    real = sum(len(encode_conversation(tok, r["messages"], 128)["input_ids"]) for r in _rows(16))
    assert summary["tokens_trained"] == 8 * real
    assert summary["tokens_per_second"] == pytest.approx(8 * real / summary["train_runtime_s"], rel=1e-6)


@pytest.mark.slow
def test_merged_model_matches_adapter_and_generates(tiny_run, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = tiny_run
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about rain (#3)."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        a = merged(**prompt).logits
        b = with_adapter(**prompt).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**prompt).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-2)  # the adapter did change the model
    gen = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
    new = gen[0, prompt["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 8 and isinstance(tok.decode(new), str)
    # It learned the replies: a training-style answer is far more likely under the merged model than the base.
    reply = tok("Rain are nice. Number 3.<|im_end|>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt["input_ids"], reply], dim=1)
    labels = torch.cat([torch.full_like(prompt["input_ids"], -100), reply], dim=1)
    with torch.no_grad(), with_adapter.disable_adapter():
        base_loss = with_adapter(input_ids=ids, labels=labels).loss
    with torch.no_grad():
        assert merged(input_ids=ids, labels=labels).loss < 0.7 * base_loss


@pytest.mark.slow
def test_space_serves_the_run_with_the_training_prompt_from_gguf_and_merged(tiny_run):
    """The contract between the halves, through the Space's own settings and backends: the run's GGUF (written by
    finetune's export step) on llama_cpp and its merged dir on transformers are fed exactly the prompt ids the
    reply was trained behind, and both decode the same greedy reply."""
    from transformers import AutoTokenizer

    from chatbot.backends import GenerationParams, load_backend
    from chatbot.backends.llama_cpp import extra_buffers
    from chatbot.settings import load_settings
    from training.chat_format import IGNORE_INDEX, encode_conversation
    from training.finetune import export_gguf_step

    cfg, _, out = tiny_run
    (gguf,) = export_gguf_step(apply_overrides(cfg, {"export.gguf": True, "export.gguf_quants": ["f16"]}),
                               out / "merged", out)
    with extra_buffers(False):
        gguf_backend = load_backend(load_settings({"CHATBOT_MODEL": str(out / "gguf"), "CHATBOT_PARALLEL": "1",
                                                   "CHATBOT_GGUF_FILE": gguf.name, "CHATBOT_THREADS": "1"}))
    hf_backend = load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(out / "merged"),
                                             "CHATBOT_THREADS": "1"}))
    fed: list[list[int]] = []
    complete = gguf_backend.llm.create_completion

    def recording(prompt, **kwargs):  # what create_chat_completion hands llama.cpp after rendering the template
        fed.append(list(prompt))
        return complete(prompt, **kwargs)

    gguf_backend.llm.create_completion = recording
    trained_tok = AutoTokenizer.from_pretrained(out / "merged")
    greedy = GenerationParams(max_new_tokens=12, temperature=0.0)
    for row in _rows(3):
        conv = [{"role": "system", "content": "Be brief."}] + row["messages"]
        ex = encode_conversation(trained_tok, conv, max_length=128)
        trained_prompt = ex["input_ids"][:next(i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)]
        from_gguf = "".join(c.text for c in gguf_backend.stream(conv[:-1], greedy))
        assert fed[-1] == trained_prompt, "llama.cpp was fed a different prompt than training used"
        assert list(hf_backend._encode(conv[:-1], return_dict=False)) == trained_prompt
        from_merged = "".join(c.text for c in hf_backend.stream(conv[:-1], greedy))
        assert from_gguf and from_gguf == from_merged


def test_sigterm_mid_evaluation_stops_it_and_resume_matches_the_uninterrupted_run(tmp_path, small_vocab_llama_dir):
    """SIGTERM during the evaluation at step 3 of 6 (mid-epoch; 8 held-out rows, one per eval batch; batch 2 x
    accumulation 2, LoRA dropout 0.1): the evaluation stops after the batch it is in, checkpoint-3 is saved, the run
    exits 143, and --resume ends with the adapter and the loss curve of the run that was never stopped (the data
    position, the dropout RNG and the accumulation all restart where they were)."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from lost_machine_harness import signal_at
    from training.finetune import run

    class EvalBatches(TrainerCallback):
        def __init__(self):
            self.steps: list[int] = []

        def on_prediction_step(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    common = {"train.max_steps": 6, "train.save_steps": 100, "train.eval_steps": 3, "export.merge": False,
              "train.learning_rate": 2e-3, "train.per_device_train_batch_size": 2,
              "train.per_device_eval_batch_size": 1, "train.gradient_accumulation_steps": 2, "lora.dropout": 0.1,
              "model.gradient_checkpointing": False}
    valid = _write_jsonl(tmp_path / "valid8.jsonl", _rows(8, offset=100))

    def cfg(out: str, **overrides) -> TrainConfig:
        return _cfg(tmp_path, small_vocab_llama_dir, out, **{**common, "data.validation_path": str(valid),
                                                             **overrides})

    full = run(cfg("full"))
    batches = EvalBatches()
    with pytest.raises(SystemExit) as stopped:
        run(cfg("split"), callbacks=[signal_at(3, event="on_prediction_step"), batches])
    assert stopped.value.code == 143
    assert batches.steps in ([3], [3, 3])  # the batch it came in (or the next), not the 8 of a whole evaluation
    assert [p.name for p in (tmp_path / "split").glob("checkpoint-*")] == ["checkpoint-3"]
    resumed = run(cfg("split", **{"train.resume": True}))
    assert resumed["resumed_from"] == "checkpoint-3" and resumed["steps"] == full["steps"] == 6
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [p["loss"] for p in resumed["train_loss"]] == pytest.approx([p["loss"] for p in full["train_loss"]],
                                                                        rel=1e-5)
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-5)
    # The evaluation at step 3 was cut short, so it left no figure; the one at step 6 is the same.
    assert [p["step"] for p in full["eval_loss"]] == [3, 6] and [p["step"] for p in resumed["eval_loss"]] == [6]
    assert resumed["eval_loss"][0]["loss"] == pytest.approx(full["eval_loss"][1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_train_as_one_ddp_run(tmp_path, tiny_model_dir):
    """`torchrun --nproc_per_node 2 training/finetune.py` (gloo on CPU): both ranks train their own shards of each
    batch, rank 0 alone writes the outputs. 4 steps x 4 rows x 2 ranks = the 16 rows twice over; two independent
    single-process runs would each have seen them once."""
    from transformers import AutoTokenizer

    from training.chat_format import encode_conversation
    from training.config import save_config

    cfg = _cfg(tmp_path, tiny_model_dir, "ddp", **{"train.max_steps": 4, "train.save_steps": 2,
                                                  "train.eval_steps": 2, "train.learning_rate": 2e-3})
    recipe = save_config(cfg, tmp_path / "recipe.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "training" / "finetune.py"), "--config", str(recipe)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(cfg.train.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    tok = AutoTokenizer.from_pretrained(out / "merged")
    real = sum(len(encode_conversation(tok, r["messages"], 128)["input_ids"]) for r in _rows(16))
    assert summary["tokens_trained"] == 2 * real
    for rel in ("adapter/adapter_model.safetensors", "merged/config.json", "checkpoint-4", "loss.png", "README.md"):
        assert (out / rel).exists(), rel
    assert summary["final_eval_loss"] is not None


def test_model_card_and_upload_plan(tmp_path, monkeypatch):
    from training.export import hub

    out = tmp_path / "run"
    for rel in ("merged/config.json", "merged/model.safetensors", "merged/tokenizer.json", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors", "gguf/run-q4_k_m.gguf", "summary.json", "loss.png",
                "config.yaml", "checkpoint-5/adapter_model.safetensors"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    cfg = load_config(REPO / "training" / "configs" / "llama-3.2-1b-finetome.yaml",
                      {"push_to_hub": "alice/llama-tome", "min_score": 4.0})
    summary = {"steps": 1250, "final_eval_loss": 0.8123, "final_train_loss": 0.9, "mode": "qlora",
               "tokens_per_second": 3000.0, "peak_memory_gb": 6.5, "wall_time_s": 3600,
               "gguf_files": ["run-q4_k_m.gguf"]}
    card = hub.model_card(cfg, summary, {"train_rows": 95000})
    (out / "README.md").write_text(card)
    assert "base_model: meta-llama/Llama-3.2-1B-Instruct" in card
    assert "CHATBOT_MODEL=alice/llama-tome" in card and "CHATBOT_GGUF_FILE=*q4_k_m.gguf" in card
    assert "mlabonne/FineTome-100k" in card and "min score: 4.0" in card
    assert "r=16, alpha=16" in card and "0.8123" in card and "0.0002" in card

    plan = hub.upload_plan(out)
    remote = [r for _, r in plan]
    assert remote == ["config.json", "model.safetensors", "tokenizer.json", "run-q4_k_m.gguf",
                      "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "run/summary.json",
                      "run/loss.png", "run/config.yaml", "README.md"]
    assert "checkpoints/checkpoint-5/adapter_model.safetensors" in [r for _, r in hub.upload_plan(out, True)]

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def list_repo_files(self, repo_id):  # a new repo: nothing stale to delete
            return []

        def create_commit(self, repo_id, operations, commit_message):
            calls["ops"] = [(op.path_in_repo, op.path_or_fileobj) for op in operations]

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    url = hub.push_run(out, "alice/llama-tome")
    assert url.endswith("alice/llama-tome") and calls["token"] == "hf_secret"
    assert calls["repo"] == ("alice/llama-tome", False, True)
    assert calls["ops"] == [(r, str(l)) for l, r in plan]


def test_cli_help_and_bad_option_from_the_script():
    script = str(REPO / "training" / "finetune.py")
    ok = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "--train.save_steps (default: 1250)" in ok.stdout
    bad = subprocess.run([sys.executable, script, "--lora.rank", "8"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option 'lora.rank'" in bad.stderr and "lora.r" in bad.stderr


@pytest.mark.slow
def test_base_without_template_gets_recipe_chatml_with_trained_new_tokens(tmp_path):
    """GPT-Neo / DialoGPT path: the base has no chat template and no <|im_start|>; the recipe's ChatML adds the
    markers as special tokens, the embeddings grow, those rows are trained, and the merged model + tokenizer
    render ChatML prompts for serving."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from training.finetune import run
    from training.trainer.shapes import build_random_model

    words = ["<unk>", "</s>", "tell", "me", "about", "are", "nice", "number", ".", "(", ")", "#"] + \
        [t for t in TOPICS] + [str(i) for i in range(10)]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="</s>", unk_token="<unk>")
    assert tok.chat_template is None
    build_random_model("tiny-llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id).save_pretrained(
        tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"messages": [{"role": "user", "content": f"tell me about {t} ( # {i} )"},
                          {"role": "assistant", "content": f"{t} are nice . number {i} ."}]}
            for i, t in enumerate(TOPICS)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg(tmp_path, tmp_path / "base", "out", **{"chat_template": "chatml", "max_steps": 3,
                                                      "data.sources": str(data), "export.merged_dtype": "float32"})
    summary = run(cfg)
    out = Path(cfg.train.output_dir)
    assert summary["steps"] == 3

    served = AutoTokenizer.from_pretrained(out / "merged")
    start, end = served.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (start, end) == (len(tok), len(tok) + 1) and served.eos_token == "<|im_end|>"
    assert served.pad_token_id not in (served.eos_token_id, None)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == len(served)
    prompt = served.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\ntell me about apples ( # 0 )<|im_end|>\n<|im_start|>assistant\n"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("trainable_tokens" in k or "token_adapter" in k for k in adapter), sorted(adapter)[:5]
