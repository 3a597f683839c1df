"""benchmarks/bench_train.py: the CPU smoke run prints a table that parses, and the helpers behave. No timing asserts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_train as bench

REPO = Path(__file__).resolve().parent.parent


def _table(text: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, smollm2_tokenizer_dir):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--shape", "tiny-llama", "--device", "cpu",
         "--steps", "2", "--warmup", "1", "--seq-len", "128", "--median-len", "48", "--batch", "2",
         "--compare", "naive,unsloth", "--tokenizer", str(smollm2_tokenizer_dir), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_cpu_smoke_table_parses_with_positive_figures(smoke):
    stdout, _ = smoke
    rows = _table(stdout)
    assert set(rows) == {"project", "naive", "unsloth"}
    for name in ("project", "naive"):
        row = rows[name]
        assert float(row["tokens/s"]) > 0
        assert float(row["peak mem GiB"].split()[0]) > 0 and row["peak mem GiB"].endswith("RSS")
        assert float(row["vs naive"].rstrip("x")) > 0
        assert float(row["FineTome-100k epoch"].split()[0]) > 0
        assert row["MFU"] == "n/a"  # no honest peak FLOP/s for a CPU
    assert rows["naive"]["vs naive"] == "1.00x"
    assert rows["project"]["packing"] == "yes" and rows["naive"]["packing"] == "no"
    assert rows["project"]["fused loss"] == "no"  # Liger needs CUDA: clean fallback
    if rows["unsloth"]["tokens/s"] == "n/a":
        assert "not run" in rows["unsloth"]["FineTome-100k epoch"]
    assert "epoch assumption: FineTome-100k = 100,000 conversations" in stdout


def test_packed_steps_carry_more_real_tokens(smoke):
    """Packing fills each of the --batch rows up to --seq-len; padded batches hold --batch conversations."""
    _, data = smoke
    by = {r["variant"]: r for r in data["results"]}
    assert by["project"]["tokens"] > by["naive"]["tokens"] > 0
    assert by["project"]["tokens"] <= 2 * 2 * 128  # steps x batch x seq_len: never more than the rows hold


def test_synthetic_rows_look_like_chat_rows():
    rows = bench.synthetic_rows(200, vocab=50, pad_id=7, median=40, max_len=64, seed=3)
    lengths = [len(r["input_ids"]) for r in rows]
    assert max(lengths) <= 64 and min(lengths) >= 32
    assert all(7 not in r["input_ids"] for r in rows)  # the Trainer counts non-pad tokens as real
    for r in rows:
        masked = sum(label == -100 for label in r["labels"])
        assert 0 < masked < len(r["labels"])
        assert r["labels"][masked:] == r["input_ids"][masked:]


def test_row_lengths_follow_the_median():
    lengths = sorted(bench.row_lengths(20_001, median=400, max_len=4096, seed=0))
    assert 360 < lengths[10_000] < 440
    assert bench.mean_row_length(400, 2048) > 400  # log-normal: mean above median


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "gpt-9"], "--shape 'gpt-9'"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "cpu", "--mode", "qlora"], "--mode qlora needs --device cuda"),
    (["--device", "cpu", "--steps", "0"], "--steps must be >= 1"),
    (["--device", "cpu", "--compare", "naive,axolotl"], "--compare 'axolotl'"),
])
def test_bad_options_fail_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_mfu_uses_device_peak():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "qlora", None) == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bf16", None) == 756.0
    assert bench.peak_tflops("cpu", "fp32", None) is None
    result = {"variant": "project", "mode": "bf16", "packing": True, "fused_loss": "liger", "attention": "sdpa",
              "tokens_per_s": 50_000.0, "peak_mem_gib": 7.5, "mem_kind": "VRAM", "device": "NVIDIA H100 80GB HBM3",
              "loss": 11.8}
    table = bench.format_table([result], matmul_params=1_000_000_000, mean_len=500.0, mode="bf16",
                               peak_override=None)
    row = _table(table)["project"]
    assert row["MFU"] == f"{6e9 * 50_000 / 989e12:.1%}"
    assert row["FineTome-100k epoch"] == f"{100_000 * 500 / 50_000 / 3600:.2f} h"
    assert row["vs naive"] == "n/a"
