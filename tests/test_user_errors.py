"""Every user mistake ends finetune.py with ONE line on stderr naming what to change, no traceback, exit 2:
the command line (subprocess) and main() on a tiny model, each mistake made for real. The Hub cases run the real
transformers/huggingface_hub download code against a local stand-in for the Hub (HF_ENDPOINT) or an empty
offline cache."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig, apply_overrides, save_config
from training.data import SourceConfig

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "training" / "finetune.py")


def _recipe(tmp_path: Path, model_dir, **overrides) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig()
    cfg.data.sources = [SourceConfig(path=str(data), format="messages")]
    cfg = apply_overrides(cfg, {"model.name_or_path": str(model_dir), "model.mode": "fp32",
                                "train.output_dir": str(tmp_path / "out"), "train.max_length": 64,
                                "train.max_steps": 1, "train.report_to": "none", "train.optim": "adamw_torch",
                                "data.validation_fraction": 0.0, "export.gguf": False, **overrides})
    return save_config(cfg, tmp_path / "recipe.yaml")


def _one_line_exit_2(capsys, argv) -> str:
    from training.finetune import main

    assert main(argv) == 2
    return _the_error_line(capsys.readouterr().err)


def _the_error_line(stderr: str) -> str:
    """The one `error:` line, last on stderr; anything before it is progress bars (tqdm), never a traceback."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], stderr[-3000:]
    return lines[-1]


def test_missing_data_file_from_the_command_line(tmp_path, tiny_llama_dir):
    recipe = _recipe(tmp_path, tiny_llama_dir)
    result = subprocess.run([sys.executable, SCRIPT, "--config", str(recipe), "--data.sources",
                             str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    line = _the_error_line(result.stderr)
    assert "missing.jsonl" in line and "not found" in line


def test_qlora_without_bitsandbytes(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    import training.trainer.hardware

    monkeypatch.setattr(training.trainer.hardware, "installed_packages", lambda: frozenset())  # as if not installed
    line = _one_line_exit_2(capsys, ["--config", str(_recipe(tmp_path, tiny_llama_dir)), "--model.mode", "qlora"])
    assert "model.mode=qlora needs bitsandbytes: pip install bitsandbytes==0.50.2" in line


def test_base_without_chat_template_and_no_model_chat_template(tmp_path, tiny_llama_dir, capsys):
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(bare)
    for f in bare.glob("*.jinja"):
        f.unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for f in Path(tiny_llama_dir).glob("*.safetensors"):
        (bare / f.name).symlink_to(f)
    (bare / "config.json").symlink_to(Path(tiny_llama_dir) / "config.json")
    line = _one_line_exit_2(capsys, ["--config", str(_recipe(tmp_path, bare))])
    assert "has no chat template: set model.chat_template" in line


@pytest.mark.parametrize("override, expected", [
    (["--model.precision", "fp16"], "model.precision=fp16 needs a CUDA GPU"),
    (["--model.attn_implementation", "flash_attention_2"], "needs an Ampere or newer GPU"),
    (["--lora.target_modules", "qkv_proj"], "lora.target_modules=['qkv_proj'] names no layer of this model"),
    (["--train.max_length", "3"], "no usable training examples left after tokenisation"),
    (["--model.mode", "gpu"], "model.mode='gpu' is not accepted"),
    (["--train.preemption_notice_s", "0"], "train.preemption_notice_s=0.0 is not valid; accepted: seconds > 0"),
])
def test_settings_that_cannot_run(tmp_path, tiny_llama_dir, capsys, override, expected):
    line = _one_line_exit_2(capsys, ["--config", str(_recipe(tmp_path, tiny_llama_dir)), *override])
    assert expected in line


def test_a_pre_quantized_base_is_refused_before_any_compute(tmp_path, tiny_llama_dir, capsys):
    """An FP8 / bitsandbytes checkpoint: the merge would add LoRA to its packed weights. Refused from config.json,
    before the data is read or a weight is loaded (no data report written)."""
    import shutil

    base = tmp_path / "fp8-base"
    shutil.copytree(tiny_llama_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(config))
    line = _one_line_exit_2(capsys, ["--config", str(_recipe(tmp_path, base))])
    assert "model.name_or_path is already quantized (quantization_config.quant_method=fp8)" in line
    assert not (tmp_path / "out" / "data_report.json").exists()


def test_lora_on_an_embedding_the_template_grows_is_refused(tmp_path, scaled_tiny_llama_without_template_dir,
                                                            capsys):
    """A recipe template whose turn markers the base lacks adds tokens whose rows train as peft trainable tokens; LoRA
    on the same embedding cannot be combined with them (peft 0.21.2 raises deep in get_peft_model, after the data
    is prepared)."""
    template = tmp_path / "turns.jinja"
    template.write_text("{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}<|turn_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}")
    recipe = _recipe(tmp_path, scaled_tiny_llama_without_template_dir, **{"model.chat_template": str(template)})
    line = _one_line_exit_2(capsys, ["--config", str(recipe), "--lora.target_modules", "q_proj,embed_tokens"])
    assert "lora.target_modules includes the input embeddings while the chat template adds" in line
    assert not (tmp_path / "out" / "data_report.json").exists()


def test_a_merge_refusal_is_one_line():
    """merge.MergeError (an adapter initialised by changing its base, a quantized base) is a user mistake, also when
    it surfaces wrapped in another exception."""
    from training.export.merge import MergeError
    from training.user_errors import explain

    refusal = MergeError("the adapter in a was initialised with init_lora_weights=pissa, which changes the base weights")
    try:
        try:
            raise refusal
        except MergeError as exc:
            raise RuntimeError("export failed") from exc
    except RuntimeError as wrapped:
        assert explain(wrapped) == str(refusal)


def test_out_of_memory_at_the_first_step(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """What torch raises when the CUDA caching allocator gives up, raised from the first training step."""
    from transformers import Trainer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB. GPU 0 has a total capacity "
                                     "of 14.74 GiB of which 1.02 GiB is free.")

    monkeypatch.setattr(Trainer, "training_step", oom)
    line = _one_line_exit_2(capsys, ["--config", str(_recipe(tmp_path, tiny_llama_dir)),
                                     "--per_device_train_batch_size", "8", "--max_length", "1024"])
    assert line.startswith("error: out of GPU memory: try train.per_device_train_batch_size=4 "
                           "(with train.gradient_accumulation_steps=8)")
    assert "train.max_length=512" in line and "model.mode=qlora" in line


def test_upload_offline_names_push_to_hub_and_where_the_files_are(tmp_path, tiny_llama_dir, capsys):
    """The run trains and writes its outputs, then the upload (HF_HUB_OFFLINE=1 in tests) cannot happen."""
    line = _one_line_exit_2(capsys, ["--config", str(_recipe(tmp_path, tiny_llama_dir)),
                                     "--push-to-hub", "alice/tiny-tuned"])
    assert line == (f"error: upload to hub.push_to_hub=alice/tiny-tuned failed (offline (HF_HUB_OFFLINE=1)): set "
                    f"HF_TOKEN to a token with write access and go online; the trained files are in {tmp_path / 'out'}")
    assert (tmp_path / "out" / "merged" / "config.json").is_file()


def test_a_bug_keeps_its_traceback(tmp_path, tiny_llama_dir, monkeypatch):
    from transformers import Trainer

    from training.finetune import main

    def bug(*args, **kwargs):
        raise KeyError("not a user mistake")

    monkeypatch.setattr(Trainer, "training_step", bug)
    with pytest.raises(KeyError):
        main(["--config", str(_recipe(tmp_path, tiny_llama_dir))])


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request like the Hub does for a gated repo (403 GatedRepo) or an unknown/private one
    (401 RepoNotFound), per the class attribute set by the test."""
    status, error_code = 403, "GatedRepo"

    def _answer(self):
        self.send_response(self.status)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "Access to this repository is restricted.")
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": self.error_code}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("status, code, expected", [
    (403, "GatedRepo", "meta-llama/Llama-3.2-1B-Instruct is gated: accept its licence on "
                       "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct and set HF_TOKEN"),
    (401, "RepoNotFound", "meta-llama/Llama-3.2-1B-Instruct is not a local folder nor a Hub repo this token can "
                          "read: check model.name_or_path"),
    (None, None, "meta-llama/Llama-3.2-1B-Instruct is not in the local Hugging Face cache and the Hub cannot be "
                 "reached"),
])
def test_gated_unknown_or_offline_hub_model(tmp_path, tiny_llama_dir, fake_hub, status, code, expected):
    recipe = _recipe(tmp_path, tiny_llama_dir)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": fake_hub,
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_TOKEN", None)
    if status is None:
        env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    else:
        _FakeHub.status, _FakeHub.error_code = status, code
    result = subprocess.run([sys.executable, SCRIPT, "--config", str(recipe), "--model.name_or_path",
                             "meta-llama/Llama-3.2-1B-Instruct"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in _the_error_line(result.stderr)
