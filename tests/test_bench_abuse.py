"""benchmarks/bench_abuse.py at its smallest size against this checkout: every attack runs and is measured, and the
figures show the fixed behaviour (nothing forged written, no direct call accepted, the system prompt refused)."""
from benchmarks.bench_abuse import main


def test_bench_abuse_smallest_size(capsys):
    figures = main(["--mib", "0.1", "--flood", "3", "--system-mb", "0.1", "--retries", "1", "--doc-repeats", "2"])
    ours = figures["this checkout"]
    assert ours["1 forged '2+2=5' rating: bytes written"] == 0
    assert ours["1 10 forged 0.1 MiB records: MB written"] == 0
    assert ours["4 3 concurrent POST /run/chat: accepted"] == 0
    assert ours["3 'hi' + 0.1 MB system prompt: answer"].startswith("⚠️ The")
    # The other visitor was answered, after it asked (0.5 s after the attack).
    assert ours["3 another visitor asking 0.5 s later: first token, s after the attack was sent"] > 0.5
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "item | this checkout"
    assert "4 3 concurrent POST /run/chat: accepted | 0" in lines  # the table's flood row
