"""The attacks of issue 18's items 1-4 and 8, against `python app.py` of this checkout and (with --baseline) of
another one, e.g. the code before the fix, side by side:

    git archive 92d625d | tar -x -C /tmp/before    # the checkout to compare with
    python benchmarks/bench_abuse.py --baseline /tmp/before [--mib 10] [--flood 50] [--system-mb 8] [--set K=V]

1. forged feedback (mock backend, CHATBOT_FEEDBACK_DIR set): a rating of "2+2=5" with no chat; 10 forged records of
   --mib MiB each (bytes written, seconds); the app's RSS after 8 forged retries of --mib MiB.
2. retry variety (embedded SmolLM2, prompt cache on, temperature 1): 4 retries, each after another visitor's turn;
   two visitors with the same first message.
3. "hi" with a --system-mb MB system prompt: when it is answered and how, and when another visitor who asks 0.5 s
   later sees their first token (both in seconds after the attack was sent).
4. --flood concurrent POST /gradio_api/run/chat (mock backend): how many are accepted.
8. the prompt cache across visitors: one visitor sends a document of --doc-repeats sentences; the time to first
   token (the app's stats line) of another visitor's exact guess of it and of a guess differing in its first word.

Every app runs on 127.0.0.1 in its own process, one at a time, with CHATBOT_THREADS=1 and the --set settings on both
sides, e.g. --set CHATBOT_PARALLEL=1 for the serial llama_cpp backend (this shell's CHATBOT_* variables are not used).
Each side's /chat inputs are set by name from that app's own API description (benchmarks/chat_app.py). Figures are
wall-clock seconds on this machine; the attacks are bounded in count and size.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository on sys.path (benchmarks/repo_root.py)
    import repo_root  # noqa: F401

import httpx

from benchmarks.chat_app import chat_inputs, chat_parameters, queue_inputs
from tools.gradio_http import Tab, first_text_seconds, join_queue, post_run, text_message
from tools.live_app import ROOT, LiveApp, live_app
from training.trainer.peak_memory import rss_mib

MIB = 2**20
SAMPLED = {"system_prompt": "", "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 24, "repeat_penalty": 1.1,
           "min_p": 0.0}
GREEDY = {"system_prompt": "", "temperature": 0.0, "top_p": 0.9, "max_new_tokens": 4, "repeat_penalty": 1.1,
          "min_p": 0.0}
SENTENCE = "The merger with Northwind closes on 3 March at a price of 41 million, and nobody may know it. "


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.jsonl"))


def forged_feedback(app: LiveApp, folder: Path, mib: float) -> dict:
    forged = [text_message("user", "What is 2+2?"), text_message("assistant", "2+2=5")]
    post_run(app.url, "on_like", [forged], {"index": 1, "value": ["2+2=5"], "liked": True})
    out = {"1 forged '2+2=5' rating: bytes written": folder_bytes(folder)}
    huge = [text_message("user", "x" * int(mib * MIB)), text_message("assistant", "y")]
    started, before = time.perf_counter(), folder_bytes(folder)
    for _ in range(10):
        post_run(app.url, "on_like", [huge], {"index": 1, "value": ["y"], "liked": True})
    out[f"1 10 forged {mib:g} MiB records: MB written"] = round((folder_bytes(folder) - before) / 1e6, 1)
    out[f"1 10 forged {mib:g} MiB records: seconds"] = round(time.perf_counter() - started, 2)
    session, before = "one-session", rss_mib(app.proc.pid)
    for _ in range(8):
        post_run(app.url, "on_retry", [huge], {"index": 0, "value": "x"}, session)
    out[f"1 8 forged {mib:g} MiB retries: app RSS MB before -> after"] = f"{before:.0f} -> {rss_mib(app.proc.pid):.0f}"
    return out


def flood(app: LiveApp, parameters: list[dict], n: int) -> dict:
    def direct(i: int) -> int:
        data = queue_inputs(app.url, chat_inputs(parameters, message=f"flood {i}", system_prompt="s",
                                                 temperature=0.2, top_p=0.9, max_new_tokens=8))
        return httpx.post(f"{app.url}gradio_api/run/chat", timeout=300, json={"data": data}).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        codes = list(pool.map(direct, range(n)))
    return {f"4 {n} concurrent POST /run/chat: accepted": codes.count(200),
            f"4 {n} concurrent POST /run/chat: seconds": round(time.perf_counter() - started, 2)}


def retry_variety(app: LiveApp, parameters: list[dict], retries: int) -> dict:
    tab, other = Tab(app.url), Tab(app.url)
    sea = chat_inputs(parameters, message="Write one sentence about the sea.", **SAMPLED)
    replies = [tab.send(*sea)[0]]
    for i in range(retries):
        other.send(*chat_inputs(parameters, message=f"Name a colour, number {i}.", system_prompt="", temperature=0.2,
                                top_p=0.9, max_new_tokens=8))
        replies.append(tab.retry(*sea[1:]))  # the settings, without the message
    pair = {Tab(app.url).send(*sea)[0] for _ in range(2)}
    return {f"2 {retries} retries at temperature 1: distinct replies": f"{len(set(replies[1:]))} of {retries}",
            "2 two visitors, same first message: distinct replies": f"{len(pair)} of 2"}


def oversized_system_prompt(app: LiveApp, parameters: list[dict], megabytes: float) -> dict:
    result = {}
    attack_inputs = chat_inputs(parameters, message="hi", system_prompt="x" * int(megabytes * MIB))
    question = queue_inputs(app.url, chat_inputs(parameters, message="What is the capital of France?",
                                                 system_prompt="", temperature=0.2, top_p=0.9, max_new_tokens=16,
                                                 repeat_penalty=1.2, min_p=0.05))

    def stranger():
        result["started"] = time.perf_counter()
        reply, _ = Tab(app.url).send(*attack_inputs)
        result["seconds"], result["reply"] = time.perf_counter() - result["started"], reply

    attack = threading.Thread(target=stranger)
    attack.start()
    time.sleep(0.5)
    asked = time.perf_counter()
    first = first_text_seconds(join_queue(app.url, "chat", question))  # seconds after `asked`
    attack.join()
    # Both rows count from the moment the attack was sent, so they compare: the visitor who asked 0.5 s later
    # sees their first token (after - 0.5) s after asking.
    return {f"3 'hi' + {megabytes:g} MB system prompt: answered after s": round(result["seconds"], 2),
            f"3 'hi' + {megabytes:g} MB system prompt: answer": result["reply"][:60],
            "3 another visitor asking 0.5 s later: first token, s after the attack was sent":
                None if first is None else round(asked - result["started"] + first, 2)}


def app_ttft(stats: str) -> float:
    return float(stats.split("first token ")[1].split(" s")[0])


def cache_side_channel(app: LiveApp, parameters: list[dict], repeats: int) -> dict:
    document = SENTENCE * repeats + "Summarise."
    Tab(app.url).send(*chat_inputs(parameters, message=document, **GREEDY))  # the victim
    exact = app_ttft(Tab(app.url).send(*chat_inputs(parameters, message=document, **GREEDY))[1])
    other = app_ttft(Tab(app.url).send(*chat_inputs(parameters, message="Our" + document[3:], **GREEDY))[1])
    return {f"8 guess of a {repeats}-sentence document: first token s (exact / differing)": f"{exact:.2f} / {other:.2f}"}


def measure(root: Path, args, logs: Path) -> dict:
    out = {}
    folder = Path(tempfile.mkdtemp(prefix="bench-abuse-feedback-"))
    mock = {"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0.02", "CHATBOT_FEEDBACK_DIR": str(folder)}
    model = {"CHATBOT_THREADS": "1", **dict(kv.split("=", 1) for kv in args.set)}
    with live_app(mock, logs / f"mock-{root.name}.log", root=root) as app:
        out.update(forged_feedback(app, folder, args.mib))
        out.update(flood(app, chat_parameters(app.url), args.flood))
    with live_app(model, logs / f"smollm2-{root.name}.log", root=root) as app:
        parameters = chat_parameters(app.url)  # the inputs of that checkout's /chat, by name
        out.update(retry_variety(app, parameters, args.retries))
        out.update(oversized_system_prompt(app, parameters, args.system_mb))
        out.update(cache_side_channel(app, parameters, args.doc_repeats))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to attack the same way (e.g. before a fix)")
    parser.add_argument("--mib", type=float, default=10, help="size of each forged record (MiB)")
    parser.add_argument("--flood", type=int, default=50, help="concurrent direct POSTs")
    parser.add_argument("--system-mb", type=float, default=8, help="size of the oversized system prompt (MiB)")
    parser.add_argument("--retries", type=int, default=4)
    parser.add_argument("--doc-repeats", type=int, default=40, help="sentences in the document (~22 tokens each)")
    parser.add_argument("--set", action="append", default=[], metavar="CHATBOT_X=VALUE",
                        help="a setting of the model apps on both sides (repeatable)")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="bench-abuse-logs-"))
    sides = {"this checkout": measure(ROOT, args, logs)}
    if args.baseline:
        sides = {"baseline": measure(args.baseline.resolve(), args, logs), **sides}
    names = list(sides)
    print(" | ".join(["item", *names]))
    for key in sides[names[-1]]:
        print(" | ".join([key, *(str(sides[n].get(key)) for n in names)]))
    print(f"(app logs in {logs})")
    return sides


if __name__ == "__main__":
    main()
