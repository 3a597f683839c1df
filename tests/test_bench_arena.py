"""benchmarks/bench_arena.py at its smallest size: a few tokens, one round, the embedded model against its copy."""
from benchmarks.bench_arena import ALONE, TURNS
from benchmarks.bench_arena import main


def test_a_normal_and_an_arena_turn_side_by_side(capsys):
    rows = main(["--reply-tokens", "4", "--rounds", "1", "--threads", "1", "--parallel", "2", "--n-ctx", "512"])
    assert set(rows) == {ALONE, *TURNS}
    for turn in (ALONE, "normal"):
        assert rows[turn]["tokens"] == 4 and len(rows[turn]["first"]) == 1
    for turn in ("arena", "arena, one after the other"):  # greedy, same weights: each side gives 4 tokens
        assert rows[turn]["tokens"] == 8 and len(rows[turn]["first"]) == 2 and rows[turn]["cpu"] > 0
    out = capsys.readouterr().out
    assert all(f"| {turn} |" in out for turn in (ALONE, *TURNS)) and "resident memory:" in out
