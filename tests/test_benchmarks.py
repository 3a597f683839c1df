"""Every benchmark runs at its smallest size, as the real script in its own process, and prints its table; none is
left without such a smoke test, and all find the repository one way (benchmarks/repo_root.py). Figures are printed
by the benchmarks, never asserted here: only that each table is there and holds numbers."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
NUMBER = r"-?\d+(?:\.\d+)?"


def benchmark_scripts() -> list[str]:
    """The runnable files in benchmarks/ (the shared helpers there have no __main__ block)."""
    return sorted(p.name for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def run_benchmark(script: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str, header: str) -> dict[str, list[str]]:
    """The markdown table under `header` (its first line): first cell -> the other cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


# ---------------------------------------------------------------- the guard

def runs_it(test_text: str, script: str) -> bool:
    """A test file runs the benchmark: as a subprocess of the script, or through its main()."""
    return (f'"{script}"' in test_text and "subprocess" in test_text) \
        or f"from benchmarks.{script.removesuffix('.py')} import main" in test_text


def test_every_benchmark_has_a_smoke_test():
    """Each benchmarks/*.py script is run by some test: named here (SMOKE) or run by its own test file."""
    own_tests = [p.read_text() for p in (REPO / "tests").glob("test_*.py") if p.name != Path(__file__).name]
    scripts = benchmark_scripts()
    assert {"bench_app.py", "bench_train.py", "gpu_acceptance.py"} <= set(scripts)  # the glob finds them
    unnamed = [s for s in scripts if s not in SMOKE and not any(runs_it(text, s) for text in own_tests)]
    assert not unnamed, f"benchmarks without a smoke test: {unnamed}"


def test_benchmarks_find_the_repository_one_way():
    """No benchmark computes the repository's path itself: run as a script it imports benchmarks/repo_root.py."""
    for script in benchmark_scripts():
        text = (BENCHMARKS / script).read_text()
        assert "import repo_root" in text, script
        assert "parent.parent" not in text and "sys.path.insert" not in text, script


def test_a_benchmark_runs_from_any_folder_without_pythonpath(tmp_path):
    """`python benchmarks/x.py` has only benchmarks/ on sys.path: repo_root makes chatbot/, training/, tools/ and
    benchmarks/ importable wherever it is started from."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_app.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bench_app.py")


# ---------------------------------------------------------------- the smoke runs, smallest size first

SMOKE = {  # script -> its smallest options (the slow ones also carry the slow mark below)
    "bench_data_keep.py": ["--conversations", "40"],
    "bench_data_max_rows.py": ["--conversations", "300", "--max-rows", "30"],
    "ttft_breakdown.py": ["--runs", "1", "--max-new-tokens", "4", "--threads", "1"],
    "bench_app.py": ["--runs", "1", "--max-new-tokens", "8", "--threads", "1"],
    "bench_turns.py": ["--visitors", "1", "--turns", "2", "--reply-tokens", "8", "--app-visitors", "1",
                       "--threads", "1", "--n-ctx", "1024", "--loop-prompts", "1", "--loop-tokens", "16",
                       "--penalties", "1.0,1.2", "--tables", "turns,loops,transformers"],
    "bench_export.py": ["--models", "tiny-llama", "--quants", "q8_0", "--threads", "1"],
    "bench_merge.py": ["--shapes", "tiny-llama"],
}


def test_bench_data_keep_smoke():
    out = run_benchmark("bench_data_keep.py", *SMOKE["bench_data_keep.py"])
    for rules in ("strict (repair: false)", "repair + windows (default)"):
        assert re.search(rf"^{re.escape(rules)}\s+{NUMBER}%\s+\d+\s+{NUMBER}$", out, re.M), out
    assert re.search(r"^after / before: \d+\.\d\dx; target >= 95%: (met|NOT met)$", out, re.M), out


def test_bench_data_max_rows_smoke():
    out = run_benchmark("bench_data_max_rows.py", *SMOKE["bench_data_max_rows.py"])
    rows = table_rows(out, "| run | training rows |")
    capped, full = rows["data.max_rows 30"], next(v for k, v in rows.items() if k.startswith("every conversation"))
    assert capped[0] == "30" and int(capped[1]) < int(full[1].replace(",", ""))
    assert "held-out rows the same: yes" in out


def test_ttft_breakdown_smoke():
    out = run_benchmark("ttft_breakdown.py", *SMOKE["ttft_breakdown.py"])
    stages = " · ".join(rf"{stage} {NUMBER} ms" for stage in ("function starts", "backend first text",
                                                               "app yields it", "client sees it"))
    for client in ("HTTP /gradio_api/call/chat", "gradio_client"):
        assert re.search(rf"^{re.escape(client)}: {stages}$", out, re.M), out


@pytest.mark.slow
def test_bench_app_smoke():
    """The raw llama-cpp-python worker, python app.py over gradio_client and over plain HTTP (its /chat inputs from
    the app's own API description), and the transformers backend, once each."""
    out = run_benchmark("bench_app.py", *SMOKE["bench_app.py"])
    for path in ("raw llama-cpp-python", "app (app.py + gradio_client)", "app (HTTP /gradio_api/call/chat)",
                 "transformers backend (same GGUF)"):
        assert re.search(rf"^{re.escape(path)}\s+{NUMBER}\s+{NUMBER}\s+8\b", out, re.M), out
    assert re.search(rf"^app over HTTP / raw: {NUMBER}× tokens/s", out, re.M), out


@pytest.mark.slow
def test_bench_turns_smoke():
    out = run_benchmark("bench_turns.py", *SMOKE["bench_turns.py"])
    turns = table_rows(out, "| turn | prompt tokens | backend, cache on")
    assert set(turns) == {"1", "2"} and all(re.fullmatch(NUMBER + "×?", c) for row in turns.values() for c in row)
    loops = table_rows(out, "| sampling | answers that loop |")
    assert len(loops) == 2 and all(row[0].endswith("%") for row in loops.values())
    kept = table_rows(out, "| turn | prompt tokens | TTFT, last conversation's cache kept")
    assert set(kept) == {"1", "2"}


@pytest.mark.slow
def test_bench_export_smoke():
    out = run_benchmark("bench_export.py", *SMOKE["bench_export.py"])
    rows = table_rows(out, "| model ")
    assert rows["tiny-llama"][0] == "q8_0" and float(rows["tiny-llama"][5]) > 0  # the GGUF file's MiB
    assert "python + imports" in rows


@pytest.mark.slow
def test_bench_merge_smoke():
    out = run_benchmark("bench_merge.py", *SMOKE["bench_merge.py"])
    lines = [line for line in out.splitlines() if line.startswith("| tiny-llama |")]
    assert [line.split("|")[2].strip() for line in lines] == ["in-memory (peft, fp32)", "streamed"]
    assert all(re.fullmatch(NUMBER, line.split("|")[3].strip()) for line in lines), out
