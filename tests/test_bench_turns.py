"""The loop measure of benchmarks/bench_turns.py: a repeated sentence counts, ordinary repetition of words does not."""
from benchmarks.bench_turns import loops


def test_a_sentence_repeated_until_the_cap_is_a_loop():
    intro = "Autumn is a season of change in many parts of the world and people enjoy it. "
    assert loops(intro + "The leaves fall down from the trees and cover the ground in gold. " * 4)


def test_an_answer_that_reuses_words_but_not_sentences_is_not_a_loop():
    text = ("To make pancakes, mix one cup of flour with one egg and one cup of milk. Heat a pan with a little "
            "butter. Pour a small amount of batter into the pan and cook until bubbles form, then flip it and cook "
            "the other side until golden. Serve the pancakes warm with fruit or syrup.")
    assert not loops(text)
    assert not loops("short answer")


def test_one_repeated_phrase_in_a_long_answer_stays_under_the_threshold():
    body = " ".join(f"word{i}" for i in range(200))
    assert not loops(body + " we hope this helps you a lot today " + " we hope this helps you a lot today")
