"""Real-world mess in, nothing useful thrown away: repaired ShareGPT dumps (chunked, aliased roles, system turns in
the middle, empty turns), long conversations as windows that fit max_length, cut-off and broken JSON files.
Fixtures are written by the tests; CPU, no network."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import data as D
from training.chat_format import IGNORE_INDEX, encode_conversation
from training.data import DataError

from data_fixtures import A, S, U, prep, write_jsonl

MAX_LENGTH = 128


def T(who, text):
    return {"from": who, "value": text}


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def enormous_conversation(exchanges: int = 30) -> list[dict]:
    turns = [T("system", "You answer in one sentence.")]
    for i in range(exchanges):
        turns += [T("human", f"Question {i}: what about item {i} " + "and more " * (i % 4)),
                  T("gpt", f"Answer {i}: item {i} is " + "fine " * (3 + i % 5))]
    return turns


def messy_sharegpt_rows() -> list[dict]:
    """(row, what becomes of it) in the shapes of real ShareGPT dumps."""
    return [
        {"conversations": [T("human", "Hi"), T("gpt", "Hello!")]},                                   # whole
        {"conversations": [T("user", "Q"), T("chatgpt", "A"), T("Human", "Q2"), T("Bing", "A2")]},  # whole (aliases)
        {"conversations": [T("prompter", "Q"), T("model", "A")]},                                   # whole (aliases)
        {"conversations": [T("gpt", "...so that is step one."), T("human", "And then?"), T("gpt", "Step two.")]},
        {"conversations": [T("gpt", "chunk"), T("bard", "more chunk"), T("human", "Q"), T("gpt", "A")]},
        {"conversations": [T("system", "Sys"), T("human", "Q"), T("gpt", "A"), T("system", "mid"),
                           T("human", "Q2"), T("gpt", "A2")]},                                       # system_mid
        {"conversations": [T("human", "Q"), T("gpt", " "), T("human", "Q again"), T("gpt", "A")]},  # empty + merged
        {"conversations": [T("human", "Q"), T("gpt", "A"), T("gpt", "A, continued")]},             # merged
        {"conversations": [T("human", "Q"), T("gpt", "A"), T("human", "left hanging")]},           # trailing_user
        {"conversations": [T("human", "Q"), T("gpt", "   ")]},                                      # drop: empty_turn
        {"conversations": [T("human", "Q"), T("function_call", "{}"), T("gpt", "A")]},             # drop: unknown_role
        {"conversations": [T("gpt", "only the model speaks")]},                                     # drop: no_assistant
        {"conversations": enormous_conversation()},                                                  # windowed
        {"conversations": [T("human", "Tell me everything. " * 40), T("gpt", "Everything. " * 40)]},  # one exchange: cut
    ]


def test_messy_sharegpt_exact_counts_windows_and_masking(tmp_path, tok):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", messy_sharegpt_rows(),
                       raw_lines=['{"conversations": [{"from": "human", "val', "not json at all"])
    result = prep(path, tokenizer=tok, max_length=MAX_LENGTH)
    rep = result.report.sources[0]
    assert (rep.format, rep.rows, rep.valid, rep.whole, rep.trimmed) == ("sharegpt", 16, 11, 5, 6)
    assert rep.dropped == {"invalid_json": 2, "unknown_role": 1, "empty_turn": 1, "no_assistant_turn": 1}
    assert rep.trimmed_by == {"empty_turn": 1, "leading_assistant": 2, "system_mid": 1, "merged_same_role": 2,
                              "trailing_user": 1}
    assert rep.kept_fraction == 11 / 16
    # Repairs keep the usable part, in order.
    assert {"messages": [U("And then?"), A("Step two.")]} in result.train
    assert {"messages": [U("Q"), A("A")]} in result.train  # the chunk before the first user turn is gone
    assert {"messages": [S("Sys"), U("Q"), A("A"), U("Q2"), A("A2")]} in result.train
    assert {"messages": [U("Q\n\nQ again"), A("A")]} in result.train
    assert {"messages": [U("Q"), A("A\n\nA, continued")]} in result.train
    assert {"messages": [U("Q"), A("A"), U("Q2"), A("A2")]} in result.train
    assert {"messages": [U("Q"), A("A")]} in result.train

    # The enormous conversation became windows of whole exchanges; the long single exchange stays one example.
    windows = [r["messages"] for r in result.train if r["messages"][0]["content"] == "You answer in one sentence."]
    windows.sort(key=lambda w: int(w[1]["content"].split()[1].rstrip(":")))  # the training mix is shuffled
    assert rep.windowed == 1 and rep.windows_from_long == len(windows) >= 3
    assert rep.cut_at_max_length == 1
    assert (rep.kept, rep.train) == (10 + len(windows), 10 + len(windows))
    answers = [m["content"] for w in windows for m in w if m["role"] == "assistant"]
    assert answers == [t["value"].strip() for t in enormous_conversation() if t["from"] == "gpt"]  # each once, in order
    for w in windows:
        assert [m["role"] for m in w[:2]] == ["system", "user"] and w[-1]["role"] == "assistant"
        enc = encode_conversation(tok, w, 1 << 30)
        assert len(enc["input_ids"]) <= MAX_LENGTH
        # Only assistant tokens are trained: the labelled spans decode to the replies and their end-of-turn token.
        spans, current = [], []
        for token, label in zip(enc["input_ids"], enc["labels"]):
            if label == IGNORE_INDEX:
                if current:
                    spans.append(current)
                current = []
            else:
                assert label == token
                current.append(token)
        spans += [current] if current else []
        assert [tok.decode(s) for s in spans] == [m["content"] + "<|im_end|>" for m in w if m["role"] == "assistant"]
    # Windows are as long as fits: two neighbours together would not.
    for a, b in zip(windows, windows[1:]):
        assert len(encode_conversation(tok, a + b[1:], 1 << 30)["input_ids"]) > MAX_LENGTH

    report = json.loads(result.report.write(tmp_path / "out")[0].read_text())
    src = report["sources"][0]
    assert (src["whole"], src["trimmed"], src["windowed"], src["windows_from_long"]) == (5, 6, 1, len(windows))
    assert src["dropped"] == rep.dropped and src["trimmed_by"] == rep.trimmed_by
    assert report["kept_fraction"] == 11 / 16 and report["max_length"] == MAX_LENGTH
    summary = result.report.summary()
    assert "kept 68.8% of the conversations read" in summary
    assert (f"long: 1 conversations windowed into {len(windows)} examples of <= {MAX_LENGTH} tokens; "
            "1 single exchanges over it (cut)") in summary
    assert "trimmed: empty_turn 1, leading_assistant 2, system_mid 1, merged_same_role 2, trailing_user 1" in summary


def test_strict_sources_drop_what_repair_keeps(tmp_path, tok):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", messy_sharegpt_rows())
    rep = prep(path, repair=False).report.sources[0]
    assert (rep.valid, rep.whole, rep.trimmed) == (5, 5, 0)
    assert rep.dropped == {"unknown_role": 1, "empty_turn": 2, "multiple_system": 1, "not_starting_with_user": 3,
                           "not_alternating": 1, "not_ending_in_assistant": 1}


def test_without_max_length_nothing_is_windowed(tmp_path, tok):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": enormous_conversation()}])
    result = prep(path, tokenizer=tok)
    assert result.report.sources[0].windowed == 0 and len(result.train) == 1
    assert "long:" not in result.report.summary()


def test_held_out_rows_stay_whole(tmp_path, tok):
    rows = [{"conversations": enormous_conversation(12 + i % 3)} for i in range(10)]
    for i, r in enumerate(rows):
        r["conversations"][0]["value"] += f" ({i})"  # distinct conversations
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    result = prep(path, tokenizer=tok, max_length=MAX_LENGTH, validation_fraction=0.2)
    rep = result.report.sources[0]
    assert (rep.validation, rep.windowed) == (2, 8)
    assert all(len(v["messages"]) > 20 for v in result.validation)
    assert len(result.train) == rep.windows_from_long > 8


@pytest.mark.parametrize("role, mapped", [
    ("human", "user"), ("user", "user"), ("prompter", "user"), ("gpt", "assistant"), ("chatgpt", "assistant"),
    ("bing", "assistant"), ("bard", "assistant"), ("model", "assistant"), ("bot", "assistant"),
    ("assistant", "assistant"), ("GPT", "assistant"), ("developer", "system"),
])
def test_role_aliases(tmp_path, role, mapped):
    first = T("human", "Q") if mapped != "user" else T(role, "Q")
    turns = [T(role, "Sys"), first, T("gpt", "A")] if mapped == "system" else \
        [first, T(role if mapped == "assistant" else "gpt", "A")]
    result = prep(write_jsonl(tmp_path / "r.jsonl", [{"conversations": turns}]))
    assert result.report.sources[0].whole == 1
    assert [m["role"] for m in result.train[0]["messages"]] == (["system"] if mapped == "system" else []) + \
        ["user", "assistant"]


# ----------------------------------------------------------------------------------------------------------
# Files


def _cut_array(tmp_path, name="finetome.json"):
    rows = [{"conversations": [T("human", f"Q{i}"), T("gpt", f"Answer number {i}, " + "long " * 20)]}
            for i in range(5)]
    text = json.dumps(rows, indent=1)
    cut = text[: text.index("Answer number 4") + 10]  # mid-string, as an interrupted download ends
    path = tmp_path / name
    path.write_text(cut, encoding="utf-8")
    return path, cut


@pytest.mark.parametrize("fmt", ["auto", "sharegpt"])
def test_truncated_json_array_is_one_clear_error(tmp_path, fmt):
    path, cut = _cut_array(tmp_path)
    line, column = cut.count("\n") + 1, len(cut.rsplit("\n", 1)[-1])
    with pytest.raises(DataError) as info:
        prep(path, fmt=fmt)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"finetome.json is not valid JSON: it ends inside a value at line {line}, column {column} "
                       f"(byte {len(cut.encode())}): was the download cut off? Download it again, or set "
                       "data.salvage_truncated: true (preview: --salvage-truncated) to keep the 4 complete records "
                       "before the cut")


def test_truncated_json_salvage_keeps_the_complete_records(tmp_path):
    path, _ = _cut_array(tmp_path)
    result = prep(path, salvage_truncated=True)
    rep = result.report.sources[0]
    assert (rep.salvaged, rep.rows, rep.valid) == (4, 4, 4)
    assert sorted(r["messages"][0]["content"] for r in result.train) == ["Q0", "Q1", "Q2", "Q3"]
    assert "salvaged 4 complete records from a cut-off file" in result.report.summary()
    # a cut inside an object wrapper ({"data": [...]}) too
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"version": 2, "data": [{"messages": [{"role": "user", "content": "Q"}, {"role": '
                       '"assistant", "content": "A"}]}, {"messages": [{"role": "user", "cont')
    assert prep(wrapped, salvage_truncated=True).report.sources[0].salvaged == 1


def test_broken_json_in_the_middle_names_the_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"messages": []},\n {"messages": [] "oops": 1}\n]\n')
    with pytest.raises(DataError, match=r"^broken.json is not valid JSON at line 3, column 18 \(byte 38\): "
                                        r"Expecting ',' delimiter; fix the file there, or set "
                                        r"data.salvage_truncated: true .* to keep the 1 complete records before it$"):
        prep(path)


def test_cli_truncated_file_is_one_line_and_exit_2(tmp_path, capsys):
    path, _ = _cut_array(tmp_path)
    with pytest.raises(SystemExit) as info:
        D.main([str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: finetome.json is not valid JSON: it ends inside a value")
    D.main([str(path), "--salvage-truncated", "--validation-fraction", "0"])
    assert "salvaged 4 complete records" in capsys.readouterr().out


def test_json_lines_with_broken_lines_are_counted(tmp_path):
    good = [{"conversations": [T("human", f"Q{i}"), T("gpt", "A")]} for i in range(5)]
    path = write_jsonl(tmp_path / "dump.jsonl", good, raw_lines=['{"conversations": [', "}{", '{"conv'])
    rep = prep(path).report.sources[0]
    assert (rep.rows, rep.valid, rep.dropped) == (8, 5, {"invalid_json": 3})


def test_first_bytes_decide_between_json_and_json_lines(tmp_path):
    rows = [{"conversations": [T("human", f"Q{i}"), T("gpt", "A")]} for i in range(3)]
    array_named_jsonl = tmp_path / "array.jsonl"
    array_named_jsonl.write_text(json.dumps(rows, indent=2))
    lines_named_json = Path(write_jsonl(tmp_path / "lines.json", rows))
    for path in (array_named_jsonl, lines_named_json):
        rep = prep(path).report.sources[0]
        assert (rep.rows, rep.valid, rep.dropped) == (3, 3, {}), path.name


def test_format_detection_error_says_what_it_saw(tmp_path):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "completion": "y"}, {"other": 1}])
    with pytest.raises(DataError, match=r"^cannot detect the format of odd.jsonl: its first row has the keys "
                                        r"\['completion', 'prompt'\]; set format to one of messages, sharegpt"):
        prep(odd)
    garbage = write_jsonl(tmp_path / "garbage.jsonl", [], raw_lines=["<html>", "404 not found", "</html>"])
    with pytest.raises(DataError, match=r"^cannot detect the format of garbage.jsonl: none of its 3 rows could "
                                        r"be parsed as a JSON object; set format"):
        prep(garbage)
