"""benchmarks/gpu_acceptance.py: on a machine without a GPU it refuses in one line, and its --cpu-smoke run goes
through every stage (throughput, the 1B recipe's code path with merge and GGUF export, a served answer, the
serving-speed comparison); the serving-speed stage's measuring code and its verdict also run on their own here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.py"


def test_without_a_gpu_it_asks_for_one_or_cpu_smoke(capsys):
    import torch

    from benchmarks.gpu_acceptance import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cpu-smoke" in err


@pytest.mark.slow
def test_cpu_smoke_passes_every_stage(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    table = lines[lines.index("| stage | result | time s | figures |") + 2:]
    rows = {}
    for line in table:
        if not line.startswith("| "):
            break
        rows[line.split("|")[1].strip()] = line.split("|")[2].strip()
    assert set(rows) == {"throughput fp32", "recipe (1B code path: 4-bit, merge, GGUF)", "serve", "serving speed"}
    assert set(rows.values()) == {"pass"}
    run_dir = tmp_path / "work" / "run"
    assert (run_dir / "merged" / "config.json").is_file() and list((run_dir / "gguf").glob("*.gguf"))


@pytest.fixture(scope="module")
def script_model(tmp_path_factory):
    """A tiny model made the way the script makes its 1B one (its tokenizer's pad token is id 0)."""
    from benchmarks.gpu_acceptance import build_model, save_tokenizer

    work = tmp_path_factory.mktemp("gpu-acceptance")
    return build_model("tiny-llama", save_tokenizer("embedded", work / "tokenizer"), work / "model")


def test_serving_speed_measures_whole_replies_through_both_backends(script_model, smollm2_gguf):
    """The GPU stage's code on the CPU: the transformers backend (CHATBOT_DEVICE=cpu here, cuda on the GPU box) and
    llama.cpp on 2 threads each decode the full reply, end-of-turn tokens ignored, and report both figures."""
    from benchmarks.gpu_acceptance import CPU_THREADS, llama_cpp_speed, serving_verdict, transformers_speed

    gpu_side = transformers_speed(script_model, "cpu", tokens=12, runs=1)
    assert (gpu_side["device"], gpu_side["dtype"], gpu_side["tokens"]) == ("cpu", "float32", 12)
    cpu_side = llama_cpp_speed(smollm2_gguf, tokens=12, runs=1)
    assert (cpu_side["threads"], cpu_side["tokens"]) == (CPU_THREADS, 12)
    for side in (gpu_side, cpu_side):
        assert side["ttft_s"] > 0 and side["tokens_per_s"] > 0
    ok, figure = serving_verdict(gpu_side, cpu_side, smoke=True)
    assert ok and "llama.cpp 2 threads" in figure
    assert serving_verdict(gpu_side, cpu_side, smoke=False)[0] is False  # a CPU never passes the GPU targets


GPU = {"device": "cuda", "dtype": "bfloat16", "ttft_s": 0.05, "tokens_per_s": 120.0, "tokens": 256}
CPU = {"threads": 2, "file": "m-q4_k_m.gguf", "ttft_s": 0.4, "tokens_per_s": 20.0, "tokens": 256}


@pytest.mark.parametrize(("gpu", "cpu", "passes"), [
    (GPU, CPU, True),                                    # 6x, 50 ms
    ({**GPU, "ttft_s": 0.31}, CPU, False),               # first token over 0.3 s
    ({**GPU, "tokens_per_s": 99.0}, CPU, False),         # 4.95x
    ({**GPU, "tokens_per_s": 100.0}, CPU, True),         # exactly 5x
    ({**GPU, "device": "cpu"}, CPU, False),
    (GPU, None, False),                                  # nothing to compare with
])
def test_serving_targets(gpu, cpu, passes):
    from benchmarks.gpu_acceptance import serving_verdict

    ok, figure = serving_verdict(gpu, cpu, smoke=False)
    assert ok is passes, figure
