"""benchmarks/gpu_acceptance.py: on a machine without a GPU it refuses in one line, and its --cpu-smoke run goes
through every stage (throughput, the 1B recipe's code path with merge and GGUF export, a served answer)."""
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
    assert set(rows) == {"throughput fp32", "recipe (1B code path: 4-bit, merge, GGUF)", "serve"}
    assert set(rows.values()) == {"pass"}
    run_dir = tmp_path / "work" / "run"
    assert (run_dir / "merged" / "config.json").is_file() and list((run_dir / "gguf").glob("*.gguf"))
