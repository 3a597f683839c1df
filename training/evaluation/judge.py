"""Optional pairwise judge: a model that says which of two answers is better, asked in both orders."""
from __future__ import annotations

import os
import re
from typing import Callable, Sequence

JUDGE_SYSTEM = "You are a strict, impartial judge of chatbot answers."
JUDGE_PROMPT = ("Question:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer is more helpful, correct "
                "and concise? Reply with one letter only: A, B, or T for a tie.")


def make_judge(url: str | None = None, gguf: str | None = None, judge_model: str | None = None,
               threads: int = 2) -> Callable[[list[dict]], str] | None:
    """messages -> reply text, through the Space's openai or llama_cpp backend; None when no judge is asked.
    A bad URL or file raises the chatbot's ConfigError (its settings validation)."""
    if not url and not gguf:
        return None
    from chatbot.backends import GenerationParams, load_backend
    from chatbot.settings import load_settings

    env = {"CHATBOT_BACKEND": "openai", "CHATBOT_OPENAI_BASE_URL": url} if url else \
        {"CHATBOT_BACKEND": "llama_cpp", "CHATBOT_MODEL": gguf, "CHATBOT_THREADS": str(threads)}
    if judge_model and url:
        env["CHATBOT_MODEL"] = judge_model
    if os.environ.get("OPENAI_API_KEY"):
        env["OPENAI_API_KEY"] = os.environ["OPENAI_API_KEY"]
    backend = load_backend(load_settings(env))
    params = GenerationParams(max_new_tokens=8, temperature=0.0, seed=0)
    return lambda messages: "".join(c.text for c in backend.stream(messages, params))


def judge_verdict(judge: Callable[[list[dict]], str], question: str, a: str, b: str) -> str:
    """'A', 'B' or 'T' (a tie, or a reply that names neither)."""
    reply = judge([{"role": "system", "content": JUDGE_SYSTEM},
                   {"role": "user", "content": JUDGE_PROMPT.format(question=question, a=a, b=b)}])
    m = re.search(r"\b([ABT])\b", reply.strip().upper())
    return m.group(1) if m else "T"


def pairwise_win_rate(judge: Callable[[list[dict]], str], reference: Sequence[dict], candidate: Sequence[dict]) -> float:
    """Share of prompts where the candidate's answer beats the reference's (ties count half). Every pair is judged
    in both orders, so a judge that always prefers the first (or second) answer scores 0.5."""
    score = 0.0
    for ref, cand in zip(reference, candidate):
        first = judge_verdict(judge, cand["prompt"], cand["text"], ref["text"])   # candidate is A
        second = judge_verdict(judge, cand["prompt"], ref["text"], cand["text"])  # candidate is B
        score += {"A": 1.0, "B": 0.0}.get(first, 0.5) + {"B": 1.0, "A": 0.0}.get(second, 0.5)
    return score / (2 * len(reference)) if reference else float("nan")
