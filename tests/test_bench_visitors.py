"""benchmarks/bench_visitors.py at its smallest size: one visitor, a few tokens, both paths through the real app."""
from benchmarks.bench_visitors import main


def test_one_visitor_through_the_serial_and_the_batched_app(capsys):
    rows = main(["--visitors", "1", "--reply-tokens", "4", "--threads", "1", "--parallel", "2", "--n-ctx", "512",
                 "--rounds", "1"])
    assert set(rows) == {("serial", 1), ("batched", 1)}
    for row in rows.values():
        assert row["tokens"] == 4 and 0 < row["slowest"] < 60 and row["aggregate"] > 0
    out = capsys.readouterr().out
    assert "| 1 | serial |" in out and "| 1 | batched |" in out and "lone visitor, batched / serial tokens/s" in out
