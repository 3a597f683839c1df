"""CHATBOT_DEVICE: the cpu/cuda and dtype decision for each GPU generation, its one-line errors (settings, the
backend, app.py's exit 2), and the decided dtype reaching the served weights."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatbot.device import Placement, choose_device
from chatbot.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
NO_GPU_LINE = "CHATBOT_DEVICE='cuda' is not valid; accepted: auto or cpu here"


@pytest.mark.parametrize(("requested", "capability", "device", "dtype"), [
    ("auto", None, "cpu", "float32"),              # this laptop
    ("cpu", None, "cpu", "float32"),
    ("cpu", (9, 0), "cpu", "float32"),             # asked for the CPU on a GPU machine
    ("auto", (7, 5), "cuda", "float16"),           # T4
    ("cuda", (7, 5), "cuda", "float16"),
    ("auto", (7, 0), "cuda", "float16"),           # V100
    ("auto", (8, 0), "cuda", "bfloat16"),          # A100
    ("auto", (8, 6), "cuda", "bfloat16"),          # A10G / RTX 30xx
    ("auto", (8, 9), "cuda", "bfloat16"),          # L4
    ("auto", (9, 0), "cuda", "bfloat16"),          # H100, H200 (ZeroGPU's emulated device reports 9.0)
    ("cuda", (9, 0), "cuda", "bfloat16"),
    ("auto", (12, 0), "cuda", "bfloat16"),         # RTX PRO 6000 Blackwell (ZeroGPU's newer hosts)
])
def test_device_and_dtype_for_each_gpu_generation(requested, capability, device, dtype):
    placement = choose_device(requested, capability)
    assert (placement.device, placement.dtype) == (device, dtype)
    assert placement.reason


def test_cuda_without_a_gpu_is_one_line_naming_what_to_change():
    with pytest.raises(ConfigError) as info:
        choose_device("cuda", None)
    assert str(info.value).startswith(NO_GPU_LINE) and "\n" not in str(info.value)


def test_placement_names_a_real_torch_dtype():
    import torch

    assert Placement("cuda", "bfloat16", "").torch_dtype() is torch.bfloat16
    assert Placement("cuda", "float16", "").torch_dtype() is torch.float16


@pytest.mark.parametrize(("env", "message"), [
    ({"CHATBOT_BACKEND": "transformers", "CHATBOT_DEVICE": "gpu"},
     "CHATBOT_DEVICE='gpu' is not valid; accepted: auto, cpu, cuda"),
    ({"CHATBOT_DEVICE": "cuda"},
     "CHATBOT_DEVICE='cuda' is not valid; accepted: auto or cpu with CHATBOT_BACKEND=llama_cpp (only the "
     "transformers backend runs on a GPU)"),
])
def test_bad_device_settings_fail_with_one_line(env, message):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value) == message


def test_device_setting_is_read_and_defaults_to_auto():
    assert load_settings({}).device == "auto"
    assert load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_DEVICE": " CUDA "}).device == "cuda"


def _app(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CHATBOT_", "SPACES_"))}
    return subprocess.run([sys.executable, str(ROOT / "app.py")], env={**clean, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_app_exits_2_with_one_line_when_cuda_is_asked_for_without_a_gpu(tiny_llama_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = _app({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(tiny_llama_dir), "CHATBOT_DEVICE": "cuda"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(NO_GPU_LINE) and len(proc.stderr.strip().splitlines()) == 1


def test_the_decided_dtype_reaches_the_served_weights(tiny_llama_dir, monkeypatch):
    """What a GPU decision changes in the backend, checked where it can run: bf16 weights (an sm80+ decision) on
    the CPU still answer, in bf16."""
    import torch

    from chatbot.backends import GenerationParams, load_backend
    from chatbot.backends import transformers as backend_module

    monkeypatch.setattr(backend_module, "detect", lambda requested: Placement("cpu", "bfloat16", "test"))
    backend = load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(tiny_llama_dir),
                                          "CHATBOT_THREADS": "1"}))
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    chunks = list(backend.stream([{"role": "user", "content": "Hi"}], GenerationParams(max_new_tokens=6,
                                                                                       temperature=0)))
    assert chunks[-1].finish_reason in ("stop", "length") and sum(c.tokens for c in chunks) >= 1
